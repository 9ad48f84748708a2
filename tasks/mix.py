"""mix: the training mixture as an index over the deduplicated shards, and the train/val split.

    python -m tasks.mix                # what `dvc repro mix` runs

Each document goes to validation or train by a hash of its id (stable when other documents
change). For the train split, source s gets the share w_s / sum(w) of `mix.total` units
(bytes or documents; by default as many units as the deduplicated train data has). A source
with less data than its share is repeated for several epochs (at most `mix.max_epochs`), one
with more is subsampled, as in LLaMA's mix: whole passes first, then a seeded random subset
for the fractional epoch. Validation keeps every held-out document once, so its loss
measures every source.

Nothing is copied: the output is an index, `data/mix/<source>.parquet` with one row per
document that is used (`shard`, `row`, `train_count` = how many times it is in the train
split, `val`), read by the tokenizer and tokenize stages together with `data/dedup`. The
sizes are read shard by shard, in parallel; what is held is one number per document.
Metrics per source: target share, realised share, epochs, documents and units.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.hashing import in_fraction
from tasks.lib.mixture import INDEX_SCHEMA
from tasks.lib.storage import atomic_dir, read_shard_table, shard_files, source_folders

STAGE = "mix"
PARAMS = ("seed", "mix")
UNTRACKED = ("executor",)
INPUTS = ("dedup",)
OUTPUTS = ("mix",)

log = logging.getLogger(STAGE)


@dataclass(frozen=True)
class SizeTask:
    path: str
    unit: str
    val_fraction: float


def shard_sizes(task: SizeTask) -> tuple[np.ndarray, np.ndarray]:
    """(units per document, is-validation per document) of one shard."""
    table = read_shard_table(Path(task.path), ["id", "text"])
    if task.unit == "bytes":
        sizes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.float64)
    else:
        sizes = np.ones(table.num_rows, dtype=np.float64)
    val = np.array([in_fraction(i, task.val_fraction, "mix:") for i in table.column("id").to_pylist()], dtype=bool)
    return sizes, val


def sample_source(sizes: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """How many times each document is taken so that the sizes add up to about `target`:
    whole passes, then a random subset for the remainder."""
    total = float(sizes.sum())
    full = int(target // total) if total > 0 else 0
    counts = np.full(len(sizes), full, dtype=np.int64)
    remainder = target - full * total
    acc = 0.0
    for i in rng.permutation(len(sizes)):
        if acc >= remainder:
            break
        # take a document if that brings the sum closer to the remainder than skipping it
        if acc + sizes[i] - remainder <= remainder - acc:
            counts[i] += 1
            acc += float(sizes[i])
    return counts


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.executor import Executor

    cfg, ex = params.mix, params.executor
    folders = source_folders(inputs["dedup"])
    weights = {n: w for n, w in cfg.weights.items() if w > 0}
    missing = [n for n in weights if n not in folders]
    if missing:
        raise StageError(f"sources {missing} have a mix weight but no deduplicated data in {inputs['dedup']}")
    shards = {name: shard_files(folders[name]) for name in sorted(weights)}
    flat = [(name, f) for name in sorted(weights) for f in shards[name]]
    with Executor(ex.kind, ex.workers, ex.ray_address, desc="mix") as pool:
        sizes = pool.map(shard_sizes, [SizeTask(str(f), cfg.unit, cfg.val_fraction) for _, f in flat])
    per_source: dict[str, list] = {name: [] for name in weights}
    for (name, f), (sz, val) in zip(flat, sizes):
        per_source[name].append((f, sz, val))
    train_sizes = {n: np.concatenate([sz[~v] for _, sz, v in parts]) if parts else np.zeros(0) for n, parts in per_source.items()}
    for name, s in train_sizes.items():
        if len(s) == 0:
            raise StageError(f"source '{name}' has no training documents left after quality and dedup")
    total = cfg.total or sum(float(a.sum()) for a in train_sizes.values())
    wsum = sum(weights.values())
    rng = np.random.default_rng(params.seed)
    metrics: dict[str, Any] = {"sources": {}, "unit": cfg.unit}
    with atomic_dir(outputs["mix"]) as out:
        for name in sorted(weights):
            target = weights[name] / wsum * total
            have = float(train_sizes[name].sum())
            capped = target > cfg.max_epochs * have
            if capped:
                log.warning("source %s: its share needs %.1f epochs, capped at mix.max_epochs=%.1f", name, target / have, cfg.max_epochs)
                target = cfg.max_epochs * have
            counts = sample_source(train_sizes[name], target, rng)
            got = float((train_sizes[name] * counts).sum())
            # the index: train counts spread back over the shards' rows, validation rows kept once
            cols: dict[str, list] = {"shard": [], "row": [], "train_count": [], "val": []}
            pos = 0
            for f, sz, val in per_source[name]:
                c = np.zeros(len(sz), dtype=np.int64)
                n_train = int((~val).sum())
                c[~val] = counts[pos : pos + n_train]
                pos += n_train
                used = np.flatnonzero((c > 0) | val)
                rel = f"{f.parent.name}/{f.name}"
                cols["shard"] += [rel] * len(used)
                cols["row"] += used.tolist()
                cols["train_count"] += c[used].tolist()
                cols["val"] += val[used].tolist()
            pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), out / f"{name}.parquet", compression="zstd")
            metrics["sources"][name] = {
                "target_share": round(weights[name] / wsum, 4),
                "units": int(got),
                "docs": int(counts.sum()),
                "unique_docs": int((counts > 0).sum()),
                "epochs": round(got / have, 3),
                "capped": capped,
                "val_docs": int(sum(int(v.sum()) for _, _, v in per_source[name])),
            }
    grand = sum(s["units"] for s in metrics["sources"].values())
    for s in metrics["sources"].values():
        s["realised_share"] = round(s["units"] / grand, 4) if grand else 0.0
    metrics["train_docs"] = sum(s["docs"] for s in metrics["sources"].values())
    metrics["val_docs"] = sum(s["val_docs"] for s in metrics["sources"].values())
    metrics["train_units"] = int(grand)
    metrics["max_share_error"] = round(max(abs(s["realised_share"] - s["target_share"]) for s in metrics["sources"].values()), 4)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
