"""dedup: exact and near-duplicate removal, within and across sources.

    python -m tasks.dedup              # what `dvc repro dedup` runs

1. Exact: documents whose normalised text (lower case, punctuation dropped, whitespace
   collapsed) hashes the same.
2. Near: MinHash signatures of word shingles (datasketch), MinHash LSH for candidate pairs,
   each pair verified by its estimated Jaccard similarity (`dedup.verify`), clusters as the
   connected components of exact groups and verified pairs (union-find).
3. One document per cluster is kept: the one from the highest role in
   `dedup.role_priority`, then the longest, then the smallest id (deterministic).

At scale the same three steps are map (signatures per shard), shuffle (group by band hash)
and reduce (union-find over candidate pairs). Metrics: removed per source (exact / near),
cluster sizes, sample clusters (`reports/dedup_clusters.json`) and pairwise precision/recall
against the ground truth of generated documents (`meta.duplicate_of`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Dedup, Params
from tasks.storage import ShardWriter, atomic_dir, progress, read_docs, source_folders, write_json

STAGE = "dedup"
PARAMS = ("seed", "collect.sources", "dedup")
INPUTS = ("filtered",)
OUTPUTS = ("dedup",)

_NON_WORD = re.compile(r"[^\w\s]+")


def normalise(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def shingles(words: list[str], k: int) -> set[bytes]:
    if len(words) <= k:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_clusters(texts: list[str], cfg: Dedup, seed: int) -> tuple[list[int], dict[str, int]]:
    """Cluster id (the smallest member index) per document, and how many pairs each step found."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    uf = UnionFind(len(texts))
    words = [normalise(t) for t in texts]
    # 1. exact duplicates of the normalised text
    first: dict[bytes, int] = {}
    exact_pairs = 0
    for i, w in enumerate(words):
        h = hashlib.sha1(" ".join(w).encode()).digest()
        if h in first:
            uf.union(first[h], i)
            exact_pairs += 1
        else:
            first[h] = i
    reps = sorted(first.values())
    # 2. near duplicates among the exact representatives
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    sigs: dict[int, LeanMinHash] = {}
    for i in progress(reps, desc="minhash"):
        m = MinHash(num_perm=cfg.num_perm, seed=seed)
        m.update_batch(list(shingles(words[i], cfg.shingle_words)))
        sigs[i] = LeanMinHash(m)
        lsh.insert(i, sigs[i])
    candidates = verified = 0
    for i in reps:
        for j in lsh.query(sigs[i]):
            if j <= i:
                continue
            candidates += 1
            if cfg.verify and sigs[i].jaccard(sigs[j]) < cfg.threshold:
                continue
            verified += 1
            uf.union(i, j)
    return [uf.find(i) for i in range(len(texts))], {"exact_pairs": exact_pairs, "candidate_pairs": candidates, "near_pairs": verified}


def pairwise_scores(pred: list[int], truth: list[str]) -> dict[str, float]:
    """Pairwise precision/recall of a clustering against ground-truth clusters."""
    def pairs(counter: Counter) -> int:
        return sum(comb(n, 2) for n in counter.values())

    tp = pairs(Counter(zip(pred, truth)))
    pred_pairs, true_pairs = pairs(Counter(pred)), pairs(Counter(truth))
    return {"precision": tp / max(pred_pairs, 1), "recall": tp / max(true_pairs, 1), "true_pairs": true_pairs, "predicted_pairs": pred_pairs}


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.dedup
    roles = {s.name: s.role for s in params.collect.sources}
    rows = [r for name, folder in source_folders(inputs["filtered"]).items() if name in roles for r in read_docs(folder)]
    cluster, found = find_clusters([r["text"] for r in rows], cfg, params.seed)

    # 3. keep one document per cluster
    rank = {role: i for i, role in enumerate(cfg.role_priority)}
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(cluster):
        members[c].append(i)
    keep = set()
    for idx in members.values():
        keep.add(min(idx, key=lambda i: (rank.get(roles[rows[i]["source"]], len(rank)), -len(rows[i]["text"]), rows[i]["id"])))

    exact_key = [hashlib.sha1(" ".join(normalise(r["text"])).encode()).digest() for r in rows]
    per_source: dict[str, Counter] = defaultdict(Counter)
    with atomic_dir(outputs["dedup"]) as out:
        writers = {name: ShardWriter(out / name, params.collect.shard_docs) for name in sorted({r["source"] for r in rows})}
        for i, r in enumerate(rows):
            s = per_source[r["source"]]
            s["docs_in"] += 1
            if i in keep:
                s["kept"] += 1
                size = len(members[cluster[i]])
                writers[r["source"]].add({**r, "meta": json.dumps({**json.loads(r["meta"]), "dedup_cluster_size": size}, sort_keys=True)})
            else:
                kept_twin = next(j for j in members[cluster[i]] if j in keep)
                s["exact_removed" if exact_key[kept_twin] == exact_key[i] else "near_removed"] += 1
        for w in writers.values():
            w.close()

    sizes = Counter(len(m) for m in members.values() if len(m) > 1)
    bins = {"2": 0, "3": 0, "4-5": 0, "6-10": 0, "11+": 0}
    for size, n in sizes.items():
        key = "2" if size == 2 else "3" if size == 3 else "4-5" if size <= 5 else "6-10" if size <= 10 else "11+"
        bins[key] += n
    dup_clusters = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
    rng = np.random.default_rng(params.seed)
    picks = sorted(rng.choice(len(dup_clusters), size=min(cfg.sample_clusters, len(dup_clusters)), replace=False)) if dup_clusters else []
    samples = [[{"id": rows[i]["id"], "kept": i in keep, "text": rows[i]["text"][:300]} for i in dup_clusters[k]] for k in picks]
    write_json(Path(params.paths.reports) / "dedup_clusters.json", samples)

    metrics: dict[str, Any] = {
        "sources": {n: {k: int(s[k]) for k in ("docs_in", "kept", "exact_removed", "near_removed")} for n, s in sorted(per_source.items())},
        "docs_in": len(rows),
        "kept": len(keep),
        "clusters_with_duplicates": len(dup_clusters),
        "cluster_sizes": bins,
        "largest_cluster": max((len(m) for m in members.values()), default=0),
        **found,
    }
    truth = [json.loads(r["meta"]).get("duplicate_of") or r["id"] for r in rows]
    if any(json.loads(r["meta"]).get("duplicate_of") for r in rows):
        metrics["vs_ground_truth"] = pairwise_scores(cluster, truth)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
