"""Chains: overlapping windows of real articles through the dedup stage, with re-clustering of
released members and neighbour edges (today) against the chaining guard alone (before), in
the same run, and against a greedy keep with exact similarities (what is achievable).

    python bench/dedup_chains.py                  # ~2,000 windows
    python bench/dedup_chains.py --stride 25

Windows: every documentation text of this Python (the built-in `python_docs` corpus) of at
least 600 words is cut into windows of `--window` words every `--stride` words, the shape of
paginated pages, syndicated excerpts and chunked corpora. The stage runs at the default
settings of params.yaml (threshold 0.5 on 3-word shingles). Reported per variant: windows
kept, and the pairs of kept windows of one article whose exact Jaccard similarity (computed
here from the shingle sets, not by the stage's MinHash) reaches the threshold: near-
duplicates that survived. "before" is the stage with its two chain fixes switched off
(edges to the bucket's first only, released members kept as they are).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import dedup  # noqa: E402
from tasks.config import parse_params  # noqa: E402
from tasks.lib import corpora  # noqa: E402
from tasks.lib.storage import doc_row, read_docs, write_docs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shingles(words: list[str], k: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def run_stage(docs: list[tuple[str, str]], params, tmp: Path) -> tuple[set[str], dict, float]:
    if tmp.exists():
        shutil.rmtree(tmp)
    write_docs(tmp / "filtered/web_crawl", (doc_row(i, "web_crawl", t) for i, t in docs))
    t0 = time.perf_counter()
    m = dedup.run(params, {"filtered": tmp / "filtered"}, {"dedup": tmp / "dedup", "report": tmp / "report"})
    dt = time.perf_counter() - t0
    return {r["id"] for r in read_docs(tmp / "dedup/web_crawl")}, m, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--stride", type=int, default=40)
    args = ap.parse_args()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["collect"]["sources"] = [{"name": "web_crawl", "kind": "builtin", "corpus": "synthetic_crawl", "role": "crawl"}]
    raw["mix"]["weights"] = {"web_crawl": 1.0}
    raw["executor"]["workers"] = 1
    params = parse_params(raw)
    k, threshold = params.dedup.shingle_words, params.dedup.threshold
    articles = [t.split() for _, t, _ in corpora.python_docs() if len(t.split()) >= 600]
    docs, owner, sets = [], {}, {}
    for a, words in enumerate(articles):
        for s in range(0, len(words) - args.window + 1, args.stride):
            wid = f"web_crawl/a{a}-{s}"
            w = words[s : s + args.window]
            docs.append((wid, " ".join(w)))
            owner[wid] = a
            sets[wid] = shingles(w, k)
    print(f"{len(articles)} articles of >= 600 words, {len(docs)} windows of {args.window} words every {args.stride}; threshold {threshold}\n")

    def surviving_pairs(kept: set[str], margin: float = 0.0) -> int:
        by_article: dict[int, list[str]] = {}
        for wid in kept:
            by_article.setdefault(owner[wid], []).append(wid)
        n = 0
        for ws in by_article.values():
            for i in range(len(ws)):
                for j in range(i + 1, len(ws)):
                    a, b = sets[ws[i]], sets[ws[j]]
                    n += len(a & b) / len(a | b) >= threshold + margin
        return n

    # greedy keep with exact similarities, article by article, in input order
    greedy = 0
    for a in range(len(articles)):
        left = [wid for wid, _ in docs if owner[wid] == a]
        while left:
            lead = left.pop(0)
            greedy += 1
            left = [w for w in left if len(sets[lead] & sets[w]) / len(sets[lead] | sets[w]) < threshold]

    tmp = Path(tempfile.mkdtemp(prefix="dedup-chains-"))
    rows = []
    try:
        kept_now, m_now, t_now = run_stage(docs, params, tmp / "now")
        original_edges, original_recluster = dedup.bucket_edges, dedup.recluster
        dedup.bucket_edges = lambda keys, neighbours=False: original_edges(keys, False)
        dedup.recluster = lambda *a, **kw: (0, 0)
        try:
            kept_before, m_before, t_before = run_stage(docs, params, tmp / "before")
        finally:
            dedup.bucket_edges, dedup.recluster = original_edges, original_recluster
        rows = [("before: chaining guard only", kept_before, m_before, t_before), ("now: re-clustered, neighbour edges", kept_now, m_now, t_now)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # MinHash (128 permutations) estimates a similarity within about +-0.05: pairs just above
    # the threshold can fall either side; those 0.1 above it are misses
    print(f"{'variant':<36} {'kept':>6} {'pairs >= t kept':>16} {'>= t + 0.1':>11} {'released':>9} {'re-clustered':>13} {'seconds':>8}")
    for name, kept, m, dt in rows:
        print(f"{name:<36} {len(kept):>6} {surviving_pairs(kept):>16} {surviving_pairs(kept, 0.1):>11} {m['released_by_chaining_guard']:>9} "
              f"{m.get('reclustered_after_release', 0):>13} {dt:8.1f}")
    print(f"{'greedy keep, exact similarities':<36} {greedy:>6} {0:>16} {0:>11}")
    print(json.dumps({"windows": len(docs), "greedy": greedy, **{n.split(':')[0]: {"kept": len(k_), "pairs": surviving_pairs(k_)} for n, k_, _, _ in rows}}))


if __name__ == "__main__":
    main()
