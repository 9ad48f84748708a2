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
import json
import random
from collections.abc import Iterator
from pathlib import Path

from typing import Any

from tasks.lib import corpora
from tasks.lib.errors import StageError
from tasks.lib.hashing import unit_interval

QUESTIONS = ["What does `{name}` do?", "Explain `{name}`.", "What is `{name}` for?", "Describe `{name}` briefly.", "How would you use `{name}`?"]


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def topic_opening(text: str) -> str:
    """The first prose paragraph of a pydoc topic. A topic opens with its title underlined
    (`The "pass" statement` over a row of `*`), then grammar and examples indented: taking
    the first paragraph as a docstring's would answer "Explain pass" with the title."""
    for block in text.strip("\n").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or lines[0].startswith(" "):  # indented: grammar or code
            continue
        if len(lines) == 2 and set(lines[1].strip()) <= set("*=-~^"):  # a title and its underline
            continue
        if lines[0].startswith(("New in version", "Changed in version", "Deprecated since version")):
            continue
        return " ".join(block.split())
    return ""


def python_qa(limit: int | None, seed: int) -> Iterator[dict]:
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    n = 0
    for module, docs in corpora.stdlib_docstrings():
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
        words = topic_opening(topics[name]).split()
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


def _records(src: Any) -> Iterator[dict]:
    if src.kind == "hf":
        import datasets

        if not src.path:
            raise StageError(f"instruction source '{src.name}': kind hf needs `path`")
        try:
            ds = datasets.load_dataset(src.path, src.config_name, data_files=src.data_files, split=src.split,
                                       revision=src.revision, streaming=True)
        except Exception as err:  # datasets raises many types; the user needs the message, not the stack
            raise StageError(f"instruction source '{src.name}': load_dataset({src.path!r}) failed: {type(err).__name__}: {err}") from None
        yield from ds
        return
    files = sorted({p for g in src.globs for p in glob.glob(g, recursive=True)})
    if not files:
        raise StageError(f"instruction source '{src.name}': no file matches {src.globs}")
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(f).to_pylist()
            except (OSError, pa.ArrowException) as err:
                raise StageError(f"{f}: not a readable Parquet file ({err})") from None
            yield from rows
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise StageError(f"{f}:{lineno}: not valid UTF-8 (byte {err.start})") from None
                except json.JSONDecodeError as err:
                    raise StageError(f"{f}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
                except RecursionError:
                    raise StageError(f"{f}:{lineno}: JSON nested too deeply to read") from None
                if not isinstance(rec, dict):
                    raise StageError(f"{f}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield rec


def load(cfg: Any, seed: int) -> list[dict]:
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
    h = unit_interval(ex_id, "instructions:") * sum(split.values())
    acc = 0.0
    for name, frac in split.items():
        acc += frac
        if h < acc:
            return name
    return list(split)[-1]


def splits(cfg: Any, seed: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in cfg.split}
    for ex in load(cfg, seed):
        out[split_of(ex["id"], cfg.split)].append(ex)
    return out


def sample(examples: list[dict], n: int, seed: int, salt: str) -> list[dict]:
    """A seeded random subset of `n` examples (all of them when there are fewer), in the
    order of the seeded shuffle: not the head of a sorted list, which would cover only the
    first modules of the alphabet."""
    order = sorted(range(len(examples)), key=lambda i: unit_interval(examples[i]["id"], f"{salt}:{seed}:"))
    return [examples[i] for i in order[:n]]


def coverage(examples: list[dict]) -> dict[str, Any]:
    """What a prompt set covers: how many examples, and how many distinct top-level modules
    or topics (the id's last part up to its first dot), with the first and last alphabetically."""
    groups = sorted({ex["id"].rsplit("/", 1)[-1].split(".", 1)[0] for ex in examples})
    return {"examples": len(examples), "groups": len(groups), "first_group": groups[0] if groups else None,
            "last_group": groups[-1] if groups else None}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- SFT batches
def encode_examples(examples: list[dict], template, max_prompt: int, max_response: int, max_len: int) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """(ids, loss mask) per usable example, and how many were too long."""
    out, dropped = [], 0
    for ex in examples:
        ids, mask = template.render(ex["messages"])
        n_resp = sum(mask)
        if n_resp == 0 or n_resp > max_response or len(ids) - n_resp > max_prompt or len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, mask))
    return out, dropped


def masked_batch(items: list[tuple[list[int], list[bool]]], pad_id: int):
    """x, y, loss_mask, right-padded: y is x shifted by one; padding carries no loss."""
    import torch

    width = max(len(ids) for ids, _ in items) - 1
    x = torch.full((len(items), width), pad_id, dtype=torch.long)
    y = torch.full((len(items), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(items), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(items):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:])
    return x, y, m
