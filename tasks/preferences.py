"""preferences: K completions per prompt from the SFT model, ranked by a labeler.

    python -m tasks.preferences         # what `dvc repro preferences` runs

Labelers (`preferences.labeler`):
- `gold`: prompts from the `rm` split; K samples each from the SFT model; ranked by the
  programmatic judge of tasks/judge.py against the reference answer (a documented stand-in
  for human labelers).
- `file`: human rankings imported from `paths.human_preferences` (JSONL), one object per
  line, either `{"prompt", "completions": [...], "ranking": [best index, ..., worst]}` or a
  chosen/rejected pair `{"prompt", "chosen", "rejected"}` as in common preference datasets.

Output: `data/preferences/{train,val}.jsonl`, one prompt per line with its completions and
ranking (the reward stage forms all C(K,2) pairs). Metrics: prompts, K, pairs, ties, and
when a prompt was ranked more than once (several labelers), their pairwise agreement.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from pathlib import Path

from tasks.config import Params
from tasks.storage import StageError, atomic_dir

STAGE = "preferences"
PARAMS = ("seed", "instructions", "preferences")
INPUTS = ("sft", "human_preferences")
OUTPUTS = ("preferences",)


def read_human(path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path}: no such file (preferences.labeler is 'file')")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(rec.get("prompt"), str):
            raise StageError(f"{path}:{n}: needs a 'prompt' string")
        if "chosen" in rec:
            if not (isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str)):
                raise StageError(f"{path}:{n}: 'chosen' and 'rejected' must both be strings")
            comps, ranking = [rec["chosen"], rec["rejected"]], [0, 1]
        else:
            comps, ranking = rec.get("completions"), rec.get("ranking")
            if not (isinstance(comps, list) and len(comps) >= 2 and all(isinstance(c, str) for c in comps)):
                raise StageError(f"{path}:{n}: 'completions' must be a list of at least 2 strings")
            if not (isinstance(ranking, list) and sorted(ranking) == list(range(len(comps)))):
                raise StageError(f"{path}:{n}: 'ranking' must order all {len(comps)} completions by index, best first")
        out.append({"id": rec.get("id") or hashlib.sha1(rec["prompt"].encode()).hexdigest()[:12], "prompt": rec["prompt"],
                    "completions": comps, "finished": [True] * len(comps), "ranking": ranking, "labeler": "file"})
    if not out:
        raise StageError(f"{path}: no preference records")
    return out


def agreement(records: list[dict]) -> float | None:
    """Share of completion pairs ordered the same way by two rankings of the same prompt."""
    by_prompt = defaultdict(list)
    for r in records:
        by_prompt[(r["prompt"], tuple(r["completions"]))].append(r["ranking"])
    same = total = 0
    for rankings in by_prompt.values():
        for a, b in itertools.combinations(rankings, 2):
            pa, pb = {c: i for i, c in enumerate(a)}, {c: i for i, c in enumerate(b)}
            for x, y in itertools.combinations(range(len(a)), 2):
                total += 1
                same += (pa[x] < pa[y]) == (pb[x] < pb[y])
    return same / total if total else None


def sample_and_rank(params: Params, sft_dir: Path) -> list[dict]:
    import torch

    from tasks import instructions
    from tasks.chat import Template
    from tasks.judge import gold_score
    from tasks.model import generate, load_checkpoint
    from tasks.storage import progress
    from tasks.tokenizer import load_tokenizer
    from tasks.train import Runtime

    cfg = params.preferences
    rt = Runtime(cfg)
    model, _ = load_checkpoint(sft_dir, rt.device)
    t = Template(load_tokenizer(sft_dir))
    prompts = [ex for ex in instructions.splits(params.instructions, params.seed)["rm"]
               if len(t.prompt(ex["messages"][0]["content"])) <= params.instructions.max_prompt_tokens][: cfg.prompts]
    if len(prompts) < 2:
        raise StageError("fewer than 2 usable prompts in the 'rm' split: widen instructions.split.rm or add sources")
    gen = torch.Generator().manual_seed(params.seed)
    rows = [(ex, k) for ex in prompts for k in range(cfg.k)]
    texts, finished = [], []
    for i in progress(range(0, len(rows), cfg.batch_size), total=(len(rows) + cfg.batch_size - 1) // cfg.batch_size, desc="sampling", unit="batch"):
        batch = rows[i : i + cfg.batch_size]
        with rt.autocast:
            outs = generate(model, [t.prompt(ex["messages"][0]["content"]) for ex, _ in batch], cfg.max_new_tokens, pad_id=t.pad,
                            stop_ids=(t.end_turn, t.eot), temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
        for o in outs:
            texts.append(t.decode(o))
            finished.append(bool(o) and o[-1] == t.end_turn)
    records = []
    for j, ex in enumerate(prompts):
        comps, fin = texts[j * cfg.k : (j + 1) * cfg.k], finished[j * cfg.k : (j + 1) * cfg.k]
        ref = ex["messages"][1]["content"]
        scores = [gold_score(c, ref, f, cfg.repetition_penalty, cfg.unfinished_penalty) for c, f in zip(comps, fin)]
        ranking = sorted(range(cfg.k), key=lambda i: (-scores[i], i))
        records.append({"id": ex["id"], "prompt": ex["messages"][0]["content"], "reference": ref, "completions": comps,
                        "finished": fin, "scores": [round(s, 4) for s in scores], "ranking": ranking, "labeler": "gold"})
    return records


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.instructions import write_jsonl
    from tasks.mix import is_val

    cfg = params.preferences
    records = read_human(inputs["human_preferences"]) if cfg.labeler == "file" else sample_and_rank(params, inputs["sft"])
    train = [r for r in records if not is_val(r["id"], cfg.val_fraction, salt="preferences:")]
    val = [r for r in records if is_val(r["id"], cfg.val_fraction, salt="preferences:")]
    if not train or not val:
        raise StageError(f"preferences split into {len(train)} train / {len(val)} val prompts: need both (more prompts or another val_fraction)")
    with atomic_dir(outputs["preferences"]) as out:
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "val.jsonl", val)
    pairs = sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in records)
    ties = sum(1 for r in records if "scores" in r for a, b in itertools.combinations(r["scores"], 2) if a == b)
    metrics = {"labeler": cfg.labeler, "prompts": len(records), "train_prompts": len(train), "val_prompts": len(val),
               "k_mean": sum(len(r["completions"]) for r in records) / len(records), "pairs": pairs, "tie_fraction": ties / pairs,
               "finished_fraction": sum(sum(r["finished"]) for r in records) / sum(len(r["finished"]) for r in records)}
    if cfg.labeler == "gold":
        best = [max(r["scores"]) for r in records]
        worst = [min(r["scores"]) for r in records]
        metrics.update(best_score_mean=sum(best) / len(best), worst_score_mean=sum(worst) / len(worst))
    agree = agreement(records)
    if agree is not None:
        metrics["labeler_agreement"] = agree
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
