"""Near-duplicate recall and precision on real text, as a function of the edit rate.

    python bench/dedup_curve.py                       # prints a table per setting
    python bench/dedup_curve.py --docs 400 --settings 3:16x8 5:16x8 3:20x6

Real text: the documentation of this Python (the docstrings of each public standard-library
module and the documentation topics, as the built-in `python_docs` source reads them),
documents of at least 150 words. For each document and edit rate r, a copy is made with a
share r of its words changed (a third replaced by another word of the corpus, a third
deleted, a third given a typo), and, as copy-paste with light edits, a copy that keeps a
contiguous 80% of the text with 2% of words changed. The stage's own functions
(`tasks.dedup.sketch`, `find_clusters`) cluster originals and copies together.

- recall at r: the share of (original, copy) pairs put in one cluster
- precision: the share of predicted same-cluster pairs that are (original, copy) pairs; the
  originals are distinct documents, so every other pair is a false positive

It also prints the S-curve 1 - (1 - s^r)^b of each setting and the measured Jaccard
similarity of copies at each edit rate, which is how the defaults in params.yaml were chosen.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import dedup  # noqa: E402
from tasks.lib import corpora  # noqa: E402
from tasks.lib.minhash import jaccard, s_curve  # noqa: E402


def real_documents(n: int, seed: int) -> list[str]:
    docs = [t for _, t, _ in corpora.python_docs() if len(t.split()) >= 150]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice(vocab))
        elif r < 2 * rate / 3:
            continue
        elif r < rate:
            i = rng.randrange(len(w)) if w else 0
            out.append(w[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[i + 1 :])
        else:
            out.append(w)
    return " ".join(out)


def excerpt(text: str, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    keep = int(len(words) * 0.8)
    start = rng.randrange(len(words) - keep + 1)
    return edit(" ".join(words[start : start + keep]), 0.02, vocab, rng)


def evaluate(originals: list[str], copies: list[str], shingle: int, bands: int, rows: int, threshold: float, seed: int) -> dict:
    texts = originals + copies
    sig, keys, exact, _ = dedup.sketch(pa.array(texts), shingle, 128, bands, rows, seed)
    labels, _ = dedup.find_clusters(sig, keys, exact, threshold, verify=True)
    n = len(originals)
    found = sum(labels[i] == labels[n + i] for i in range(n))
    pairs = 0
    for lab in np.unique(labels):
        k = int((labels == lab).sum())
        pairs += k * (k - 1) // 2
    sims = jaccard(sig[:n], sig[n:])
    return {"recall": found / n, "predicted_pairs": pairs, "true_found": found, "jaccard": float(np.median(sims))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--rates", type=float, nargs="*", default=[0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--settings", nargs="*", default=["5:16x8@0.7", "3:16x8@0.5", "3:20x6@0.5", "3:32x4@0.4", "2:20x6@0.5"],
                    help="shingle:bands x rows@threshold")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    originals = real_documents(args.docs, args.seed)
    vocab = sorted({w for t in originals for w in t.split()})
    print(f"{len(originals)} real documents (Python's documentation), median {int(np.median([len(t.split()) for t in originals]))} words")
    variants = {f"{r:.0%} words edited": [edit(t, r, vocab, rng) for t in originals] for r in args.rates}
    variants["80% excerpt + 2% edits"] = [excerpt(t, vocab, rng) for t in originals]
    for setting in args.settings:
        shingle, rest = setting.split(":")
        br, thr = rest.split("@")
        bands, rows = map(int, br.split("x"))
        t0 = time.time()
        print(f"\nshingle {shingle} words, {bands} bands x {rows} rows, threshold {thr}: "
              f"S-curve 50% at s = {(1 / bands) ** (1 / rows):.2f}; P(candidate) at s = 0.5/0.7/0.9: "
              + " / ".join(f"{float(s_curve(s, bands, rows)):.2f}" for s in (0.5, 0.7, 0.9)))
        print(f"  {'copies':>24} | median Jaccard | recall | precision")
        for name, copies in variants.items():
            r = evaluate(originals, copies, int(shingle), bands, rows, float(thr), args.seed)
            precision = r["true_found"] / max(r["predicted_pairs"], 1)
            print(f"  {name:>24} | {r['jaccard']:14.2f} | {r['recall']:6.2f} | {precision:9.3f}")
        print(f"  ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
