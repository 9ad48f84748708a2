"""mix: sample the training mixture to the target weights and split train/validation.

    python -m tasks.mix                # what `dvc repro mix` runs

Each document goes to validation or train by a hash of its id (stable when other documents
change). For the train split, source s gets the share w_s / sum(w) of `mix.total` units
(bytes or documents; by default as many units as the deduplicated train data has). A source
with less data than its share is repeated for several epochs (at most `mix.max_epochs`), one
with more is subsampled, as in LLaMA's mix; whole passes first, then a seeded random subset
for the fractional epoch. The train rows are shuffled with the seed. Validation keeps every
held-out document once, unshuffled by weight, so its loss measures every source.

Outputs: `data/mix/train/part-*.parquet`, `data/mix/val/part-*.parquet`. Metrics per source:
target share, realised share, epochs, documents and units.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.storage import StageError, atomic_dir, read_docs, source_folders, write_docs

STAGE = "mix"
PARAMS = ("seed", "mix")
INPUTS = ("dedup",)
OUTPUTS = ("mix",)

log = logging.getLogger(STAGE)


def is_val(doc_id: str, fraction: float, salt: str = "") -> bool:
    """A stable pseudo-random choice by id; `salt` makes it independent of other such splits."""
    h = int.from_bytes(hashlib.sha256((salt + doc_id).encode()).digest()[:4], "big")
    return h / 2**32 < fraction


def units(text: str, unit: str) -> int:
    return len(text.encode("utf-8")) if unit == "bytes" else 1


def sample_source(sizes: np.ndarray, target: float, rng: np.random.Generator) -> list[int]:
    """Indices (with repeats) whose sizes add up to about `target`: whole passes, then a
    random subset for the remainder."""
    total = float(sizes.sum())
    full = int(target // total) if total > 0 else 0
    picks = list(range(len(sizes))) * full
    remainder = target - full * total
    acc = 0.0
    for i in rng.permutation(len(sizes)):
        if acc >= remainder:
            break
        # take a document if that brings the sum closer to the remainder than skipping it
        if acc + sizes[i] - remainder <= remainder - acc:
            picks.append(int(i))
            acc += float(sizes[i])
    return picks


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.mix
    folders = source_folders(inputs["dedup"])
    weights = {n: w for n, w in cfg.weights.items() if w > 0}
    missing = [n for n in weights if n not in folders]
    if missing:
        raise StageError(f"sources {missing} have a mix weight but no deduplicated data in {inputs['dedup']}")
    train: dict[str, list[dict]] = {}
    val: list[dict] = []
    for name in sorted(weights):
        rows = read_docs(folders[name])
        train[name] = [r for r in rows if not is_val(r["id"], cfg.val_fraction)]
        val += [r for r in rows if is_val(r["id"], cfg.val_fraction)]
        if not train[name]:
            raise StageError(f"source '{name}' has no training documents left after quality and dedup")
    avail = {n: np.array([units(r["text"], cfg.unit) for r in rows], dtype=np.float64) for n, rows in train.items()}
    total = cfg.total or sum(float(a.sum()) for a in avail.values())
    wsum = sum(weights.values())

    rng = np.random.default_rng(params.seed)
    mixed: list[dict] = []
    metrics: dict[str, Any] = {"sources": {}, "unit": cfg.unit}
    for name in sorted(weights):
        target = weights[name] / wsum * total
        have = float(avail[name].sum())
        capped = target > cfg.max_epochs * have
        if capped:
            log.warning("source %s: its share needs %.1f epochs, capped at mix.max_epochs=%.1f", name, target / have, cfg.max_epochs)
            target = cfg.max_epochs * have
        picks = sample_source(avail[name], target, rng)
        seen: dict[int, int] = {}
        for i in picks:
            seen[i] = seen.get(i, 0) + 1
            row = train[name][i]
            mixed.append({**row, "meta": json.dumps({**json.loads(row["meta"]), "repeat": seen[i] - 1}, sort_keys=True)})
        got = float(avail[name][picks].sum()) if picks else 0.0
        metrics["sources"][name] = {
            "target_share": round(weights[name] / wsum, 4),
            "units": int(got),
            "docs": len(picks),
            "unique_docs": len(seen),
            "epochs": round(got / have, 3),
            "capped": capped,
            "val_docs": sum(r["source"] == name for r in val),
        }
    grand = sum(s["units"] for s in metrics["sources"].values())
    for s in metrics["sources"].values():
        s["realised_share"] = round(s["units"] / grand, 4) if grand else 0.0
    order = rng.permutation(len(mixed))
    with atomic_dir(outputs["mix"]) as out:
        metrics["train_docs"] = write_docs(out / "train", (mixed[i] for i in order), params.collect.shard_docs)
        metrics["val_docs"] = write_docs(out / "val", val, params.collect.shard_docs)
    metrics["train_units"] = int(grand)
    metrics["max_share_error"] = round(max(abs(s["realised_share"] - s["target_share"]) for s in metrics["sources"].values()), 4)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
