"""Instruction data for SFT, preference prompts, PPO prompts and evaluation.

Sources (params.yaml `instructions.sources`):
- builtin `python_qa`: real question/answer pairs made from what every Python install has:
  "What does `json.dumps` do?" answered by the first paragraph of its docstring, and
  "Explain <topic> in Python." answered by the opening of that documentation topic.
- `files` (.jsonl / .parquet) and `hf` (`datasets.load_dataset`) in the common formats:
  `messages` (a list of {role, content}), `prompt`/`response`, `instruction`/`input`/`output`
  (Alpaca), `question`/`answer`.

Every example gets a stable id, and a hash of the id puts it in one split (sft, sft_val, rm,
ppo, eval), so the stages train and evaluate on different prompts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

from tasks import builtin
from tasks.config import InstructionSource, Instructions
from tasks.storage import StageError

QUESTIONS = ["What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?", "Describe `{name}` briefly.", "How would you use `{name}`?"]


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def python_qa(limit: int | None, seed: int) -> Iterator[dict]:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    n = 0
    for module, docs in builtin.stdlib_docstrings():
        for head, doc in docs:
            if not head:
                continue
            answer = first_paragraph(doc)
            if not 4 <= len(answer.split()) <= 200:
                continue
            name = head.split("(")[0]
            yield {"id": f"python_qa/{name}", "messages": [
                {"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                {"role": "assistant", "content": answer}]}
            n += 1
            if limit is not None and n >= limit:
                return
    for name in sorted(topics):
        words = first_paragraph(topics[name]).split()
        if len(words) >= 4:
            yield {"id": f"python_qa/topic/{name}", "messages": [
                {"role": "user", "content": f"Explain {name} in Python."},
                {"role": "assistant", "content": " ".join(words[:120])}]}


def to_messages(rec: dict) -> list[dict] | None:
    """The conversation of a record in any of the common formats, or None."""
    if isinstance(rec.get("messages"), list):
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in rec["messages"] if isinstance(m, dict)]
        return msgs if msgs and all(isinstance(m["content"], str) for m in msgs) else None
    for q, a in (("prompt", "response"), ("question", "answer"), ("prompt", "completion")):
        if isinstance(rec.get(q), str) and isinstance(rec.get(a), str):
            return [{"role": "user", "content": rec[q]}, {"role": "assistant", "content": rec[a]}]
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    return None


def _records(src: InstructionSource) -> Iterator[dict]:
    if src.kind == "hf":
        import datasets

        if not src.path:
            raise StageError(f"instruction source '{src.name}': kind hf needs `path`")
        try:
            yield from datasets.load_dataset(src.path, src.config_name, data_files=src.data_files, split=src.split, streaming=True)
        except FileNotFoundError as err:
            raise StageError(f"instruction source '{src.name}': {err}") from None
        return
    files = sorted({p for g in src.globs for p in glob.glob(g, recursive=True)})
    if not files:
        raise StageError(f"instruction source '{src.name}': no file matches {src.globs}")
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from pq.read_table(f).to_pylist()
        else:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)


def load(cfg: Instructions, seed: int) -> list[dict]:
    out: list[dict] = []
    for src in cfg.sources:
        n = 0
        if src.kind == "builtin":
            items = python_qa(src.limit, seed)
        else:
            items = ({"id": f"{src.name}/{i}", "messages": to_messages(r)} for i, r in enumerate(_records(src)))
        for ex in items:
            if src.limit is not None and n >= src.limit:
                break
            if ex["messages"]:
                out.append(ex)
                n += 1
        if n == 0:
            raise StageError(f"instruction source '{src.name}' yielded no conversation (formats: messages, prompt/response, instruction/output, question/answer)")
    return out


def split_of(ex_id: str, split: dict[str, float]) -> str:
    h = int.from_bytes(hashlib.sha256(ex_id.encode()).digest()[:4], "big") / 2**32 * sum(split.values())
    acc = 0.0
    for name, frac in split.items():
        acc += frac
        if h < acc:
            return name
    return list(split)[-1]


def splits(cfg: Instructions, seed: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in cfg.split}
    for ex in load(cfg, seed):
        out[split_of(ex["id"], cfg.split)].append(ex)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
