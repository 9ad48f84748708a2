"""Dedup speed: this project's MinHash LSH (numba-compiled signatures, band keys sorted with numpy,
linear bucket edges) against the plain datasketch loop, on the same documents.

    python bench/dedup_speed.py --docs 100000

Both read the documents from memory or disk as they would in use: the baseline from a list,
this project's map from Parquet shards written beforehand (as the stage reads its input),
each worker writing its signatures and band keys to disk for the reduce. Starting the worker
processes (imports, loading the compiled kernels: about 1 s for two, once per stage run whatever the
corpus size) is timed apart and printed beside the ratio.
The documents are real text (Python's documentation paragraphs, recombined into documents of
about 200 words) with 20% near-duplicate copies. The baseline is the usual datasketch
recipe: for each document `MinHash.update_batch` over its word 3-shingles, `MinHashLSH.insert`,
then `query` for every document. Both use 128 permutations and 3-word shingles. Printed:
documents per second of each, the ratio, and how many duplicate pairs each found.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks import dedup  # noqa: E402
from tasks.lib import corpora  # noqa: E402


def make_documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    paras = [p for _, t, _ in corpora.python_docs() for p in t.split("\n\n") if 20 <= len(p.split()) <= 120]
    docs = []
    while len(docs) < n:
        if docs and rng.random() < 0.2:  # a near-duplicate of an earlier document
            words = rng.choice(docs).split()
            docs.append(" ".join(w for w in words if rng.random() > 0.03))
            continue
        text, k = [], 0
        while k < 200:
            p = rng.choice(paras)
            text.append(p)
            k += len(p.split())
        docs.append("\n\n".join(text))
    return docs


def datasketch_loop(docs: list[str], threshold: float) -> int:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    sigs = []
    for i, d in enumerate(docs):
        words = re.sub(r"[^\w\s]+", " ", d.lower()).split()
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([" ".join(words[j : j + 3]).encode() for j in range(max(len(words) - 2, 1))])
        lsh.insert(i, m)
        sigs.append(m)
    return sum(1 for i, m in enumerate(sigs) for j in lsh.query(m) if j > i)


def ours(ex, bands: int, rows: int, threshold: float, shards_dir: Path) -> int:
    """The stage's own map and reduce: `sign_shard` on each Parquet shard of 5,000 documents
    (written beforehand, as the stage finds its input on disk) on the executor's processes,
    then the reduce (`find_clusters`) over the signatures and band keys the map wrote."""
    from tasks.lib.storage import shard_files

    files = shard_files(shards_dir)
    work = Path(tempfile.mkdtemp(prefix="sign-", dir=shards_dir.parent))
    try:
        ex.map(dedup.sign_shard, [dedup.SignTask(i, str(f), str(work), 3, 128, bands, rows, 1) for i, f in enumerate(files)])
        sig, keys, exact = (np.concatenate([np.load(work / f"{kind}-{i:06d}.npy") for i in range(len(files))])
                            for kind in ("sig", "keys", "exact"))
        labels, _ = dedup.find_clusters(sig, keys, exact, threshold, verify=True)
    finally:
        shutil.rmtree(work)
    sizes = np.bincount(labels)
    return int((sizes * (sizes - 1) // 2).sum())


HOLD = 1.0


def start_worker(item: tuple[float, dedup.SignTask]) -> None:
    """What a worker does on its first shard (imports, loading the compiled kernels), on a
    shard of 100 documents; then hold the worker a moment so that each warm-up item lands on
    a different worker."""
    hold, task = item
    dedup.sign_shard(task)
    time.sleep(hold)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    docs = make_documents(args.docs, args.seed)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{len(docs)} documents, {mb:.1f} MB")
    from tasks.lib.executor import Executor, cores
    from tasks.lib.storage import doc_row, shard_files, write_docs

    tmp = Path(tempfile.mkdtemp(prefix="dedup-speed-"))
    try:
        write_docs(tmp / "docs", (doc_row(f"d{i}", "bench", d) for i, d in enumerate(docs)))  # 5,000 per shard
        write_docs(tmp / "warm", (doc_row(f"w{i}", "bench", d) for i, d in enumerate(docs[:100])))
        datasketch_loop(docs[:200], 0.5)  # warm-up: imports are paid once per process
        t0 = time.perf_counter()
        pairs_base = datasketch_loop(docs, 0.5)
        t_base = time.perf_counter() - t0
        print(f"datasketch loop (baseline):         {t_base:7.1f} s  {len(docs) / t_base:9.0f} docs/s  {pairs_base} candidate pairs")
        for workers in sorted({1, cores()}):
            with Executor("local", workers, desc="sketch") as ex:
                t0 = time.perf_counter()
                hold = HOLD if workers > 1 else 0.0
                warm = [(hold, dedup.SignTask(i, str(shard_files(tmp / "warm")[0]), str(tmp / "warm"), 3, 128, 20, 6, 1))
                        for i in range(workers)]
                ex.map(start_worker, warm)  # a stage pays this once per run, whatever its size
                t_start = time.perf_counter() - t0 - hold
                t0 = time.perf_counter()
                pairs_ours = ours(ex, 20, 6, 0.5, tmp / "docs")
                t_ours = time.perf_counter() - t0
            print(f"this project, {workers} process(es), started: {t_ours:7.1f} s  {len(docs) / t_ours:9.0f} docs/s  {pairs_ours} pairs in clusters"
                  f"  x{t_base / t_ours:.1f} the baseline  (start-up: imports and loading the compiled kernels, {t_start:.1f} s more,"
                  f" x{t_base / (t_ours + t_start):.1f} with it)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
