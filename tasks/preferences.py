"""preferences: K completions per prompt from the SFT model, ranked by a labeler.

    python -m tasks.preferences         # what `dvc repro preferences` runs

Labelers (`preferences.labeler`):
- `gold`: prompts from the `rm` split; K samples each from the SFT model; ranked by the
  programmatic judge of tasks/lib/judge.py against the reference answer (a documented stand-in
  for human labelers).
- `file`: human rankings imported from `paths.human_preferences` (JSONL), one object per
  line, either `{"prompt", "completions": [...], "ranking": [best index, ..., worst]}` (with
  optional `labeler`, `ties`, `flagged`, `finished`: tasks/lib/rankings.py) or a
  chosen/rejected pair `{"prompt", "chosen", "rejected"}` as in common preference datasets.
  The labeling app (`python -m tasks.label`) writes this file.

Output: `data/preferences/{train,val,test}.jsonl`, one ranking per line with its completions
(the reward stage forms the C(K,2) pairs, less tied pairs and pairs with a flagged
completion; `val` picks the reward model's best step, `test` only measures it);
with the gold labeler also `to_rank.jsonl`, the sampled prompts and completions for people
to rank in the labeling app. Metrics: prompts, K, pairs, usable pairs, ties, flagged
completions, human vs judge labels, labelers, and where a prompt was ranked more than once
(several labelers) their pairwise agreement; the agreement of people with the judge where
the rankings carry its scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_dir

STAGE = "preferences"
PARAMS = ("seed", "instructions", "judge", "preferences")
INPUTS = ("sft", "labels")  # data/labels.json (the sources stage): the rankings file's hash in file mode, nothing else in gold
OUTPUTS = ("preferences",)


def read_human(path: Path) -> list[dict]:
    """The rankings file (format: tasks/lib/rankings.py), checked line by line."""
    from tasks.lib.rankings import read_jsonl

    if not path.is_file():
        raise StageError(f"{path}: no such file (preferences.labeler is 'file')")
    out = read_jsonl(path)
    if not out:
        raise StageError(f"{path}: no preference records (rank some with `python -m tasks.label --labeler NAME`)")
    return out


def agreement(records: list[dict]) -> float | None:
    """Share of completion pairs ordered the same way (better, worse or tied) by two rankings
    of the same prompt; pairs with a flagged completion are left out."""
    from tasks.lib.rankings import agreement as pairwise

    return pairwise(records)


def select_prompts(examples: list[dict], template, max_prompt_tokens: int, n: int, seed: int) -> list[dict]:
    """A seeded random sample of the usable `rm` prompts (not the head of a sorted list,
    which would cover only the first modules of the alphabet)."""
    from tasks.lib.instructions import sample

    usable = [ex for ex in examples if len(template.prompt(ex["messages"][0]["content"])) <= max_prompt_tokens]
    return sample(usable, n, seed, "preferences")


def sample_and_rank(params: Params, sft_dir: Path) -> list[dict]:
    import torch

    from tasks.lib import instructions
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.judge import Judge
    from tasks.lib.model import generate, load_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.storage import progress
    from tasks.lib.template import Template

    cfg, sp, jd = params.preferences, params.preferences.sampling, params.judge
    rt = Runtime(cfg.compute)
    model, _ = load_checkpoint(sft_dir, rt.device)
    t = Template(load_tokenizer(sft_dir))
    splits = instructions.splits(params.instructions, params.seed)
    judge = Judge([(ex["messages"][0]["content"], ex["messages"][1]["content"]) for split in splits.values() for ex in split],
                  jd.repetition_penalty, jd.unfinished_penalty, jd.contrast_references)
    prompts = select_prompts(splits["rm"], t, params.instructions.max_prompt_tokens, cfg.prompts, params.seed)
    if len(prompts) < 2:
        raise StageError("fewer than 2 usable prompts in the 'rm' split: widen instructions.split.rm or add sources")
    gen = torch.Generator().manual_seed(params.seed)
    rows = [(ex, k) for ex in prompts for k in range(cfg.k)]
    texts, finished = [], []
    for i in progress(range(0, len(rows), cfg.batch_size), total=(len(rows) + cfg.batch_size - 1) // cfg.batch_size, desc="sampling", unit="batch"):
        batch = rows[i : i + cfg.batch_size]
        with rt.autocast:
            outs = generate(model, [t.prompt(ex["messages"][0]["content"]) for ex, _ in batch], sp.max_new_tokens, pad_id=t.pad,
                            stop_ids=t.stop_ids, temperature=sp.temperature, top_p=sp.top_p, generator=gen, compile=rt.compiled)
        for o in outs:
            texts.append(t.decode(o))
            finished.append(bool(o) and o[-1] == t.end_turn)
    records = []
    for j, ex in enumerate(prompts):
        comps, fin = texts[j * cfg.k : (j + 1) * cfg.k], finished[j * cfg.k : (j + 1) * cfg.k]
        ref = ex["messages"][1]["content"]
        scores = judge.scores(comps, [ex["messages"][0]["content"]] * len(comps), [ref] * len(comps), fin).tolist()
        ranking = sorted(range(cfg.k), key=lambda i: (-scores[i], i))
        records.append({"id": ex["id"], "prompt": ex["messages"][0]["content"], "reference": ref, "completions": comps,
                        "finished": fin, "scores": [round(s, 4) for s in scores], "ranking": ranking, "labeler": "gold"})
    return records


def to_rank(records: list[dict]) -> list[dict]:
    """What the labeling app shows (tasks/label.py): per prompt its K completions, whether
    each ended its turn, and the judge's scores (never shown, for the judge-agreement metric)."""
    return [{"id": r["id"], "prompt": r["prompt"], "completions": r["completions"], "finished": r["finished"],
             "k": len(r["completions"]), "judge_scores": r["scores"]} for r in records]


def label_metrics(records: list[dict]) -> dict:
    """Who labelled what: human vs judge rankings, labelers, ties, flags, usable pairs, and
    the pairwise agreement between labelers (and with the judge) where they overlap."""
    from tasks.lib.rankings import JUDGE, agreement_counts, judge_agreement, preference_pairs

    human = [r for r in records if r.get("labeler") != JUDGE]
    pairs = sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in records)
    usable = sum(len(preference_pairs(r["ranking"], r.get("ties") or (), r.get("flagged") or (), r.get("scores"))) for r in records)
    m = {"human_labels": len(human), "judge_labels": len(records) - len(human), "labelers": len({r.get("labeler") for r in records}),
         "pairs": pairs, "usable_pairs": usable, "tie_fraction": (pairs - usable - sum(_flag_pairs(r) for r in records)) / pairs,
         "flagged_completions": sum(len(r.get("flagged") or ()) for r in records)}
    same, total, shared = agreement_counts(records)
    m["agreement_prompts"] = shared
    if total:
        m["labeler_agreement"] = same / total
    ja = judge_agreement(human)
    if ja is not None:
        m["judge_agreement"] = ja
    return m


def _flag_pairs(r: dict) -> int:
    """Pairs of a ranking that involve a flagged completion."""
    k, f = len(r["completions"]), len(r.get("flagged") or ())
    return k * (k - 1) // 2 - (k - f) * (k - f - 1) // 2


def split_of_prompt(prompt_id: str, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, by a hash of the prompt's id: every ranking of one prompt (several
    labelers) lands on the same side."""
    from tasks.lib.hashing import unit_interval

    u = unit_interval(prompt_id, "preferences:")
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.instructions import write_jsonl

    cfg = params.preferences
    records = read_human(Path(params.paths.human_preferences)) if cfg.labeler == "file" else sample_and_rank(params, inputs["sft"])
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in records:
        parts[split_of_prompt(r["id"], cfg.val_fraction, cfg.test_fraction)].append(r)
    if not all(parts.values()):
        raise StageError(f"preferences split into {len(parts['train'])} train / {len(parts['val'])} val / {len(parts['test'])} test "
                         "prompts: need all three (more prompts, or other val_fraction / test_fraction)")
    train, val = parts["train"], parts["val"]
    with atomic_dir(outputs["preferences"]) as out:
        for name, rows in parts.items():
            write_jsonl(out / f"{name}.jsonl", rows)
        if cfg.labeler == "gold":  # the sampled completions, for people to rank (python -m tasks.label)
            write_jsonl(out / "to_rank.jsonl", to_rank(records))
    metrics = {"labeler": cfg.labeler, "prompts": len(records), "train_prompts": len(train), "val_prompts": len(val), "test_prompts": len(parts["test"]),
               "k_mean": sum(len(r["completions"]) for r in records) / len(records), **label_metrics(records),
               "finished_fraction": sum(sum(r["finished"]) for r in records) / sum(len(r["finished"]) for r in records)}
    if cfg.labeler == "gold":
        from tasks.lib.instructions import coverage

        metrics["coverage"] = coverage(records)
        best = [max(r["scores"]) for r in records]
        worst = [min(r["scores"]) for r in records]
        metrics.update(best_score_mean=sum(best) / len(best), worst_score_mean=sum(worst) / len(worst))
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
