"""Decontamination, as GPT-3 did it: which evaluation examples share a word n-gram (13 by
default) with the training data.

    index = NgramIndex({"prompt": prompts, "reference": references}, n=13)
    index.scan("pretrain:web_crawl", texts)   # any number of scans, each a named source
    index.dirty()    # (items,) bool: some field of the item shares an n-gram with some source
    index.report()   # counts per field and source, and how many items were too short to check

Texts are normalised as dedup normalises them (tasks/lib/minhash.py: lower-cased letters and
digits, anything else a word break), so "Return the value." and "return the VALUE" match.
An n-gram is a 64-bit polynomial hash of its n word hashes; a field shorter than n words
cannot be checked and is never marked (counted as `too_short`). The scan is vectorised over
a whole batch of documents (one pass over their words per n-gram position).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from tasks.lib.minhash import normalise, word_hashes

_BASE = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(texts: pa.Array | Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every n-gram of every text, index of the text it came from)."""
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), pa.large_string())
    words, offsets = word_hashes(normalise(arr))
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        for t in range(n):
            h = h * _BASE + words[t : t + m]
    doc = np.searchsorted(offsets, np.arange(m), side="right") - 1
    ok = np.arange(m) + n <= offsets[doc + 1]  # the n-gram ends inside its own text
    return h[ok], doc[ok]


class NgramIndex:
    def __init__(self, fields: dict[str, Sequence[str]], n: int):
        self.n, self.fields = n, list(fields)
        sizes = {len(v) for v in fields.values()}
        if len(sizes) != 1:
            raise ValueError("every field needs one text per item")
        self.items = sizes.pop()
        self.owner: dict[int, set[tuple[int, int]]] = {}  # n-gram hash -> {(field, item)}
        self.checked = np.zeros((len(fields), self.items), dtype=bool)
        for f, texts in enumerate(fields.values()):
            hashes, doc = ngram_hashes(texts, n)
            self.checked[f, np.unique(doc)] = True
            for h, d in zip(hashes.tolist(), doc.tolist()):
                self.owner.setdefault(h, set()).add((f, d))
        self.keys = np.fromiter(self.owner, dtype=np.uint64, count=len(self.owner))
        self.hits: dict[str, np.ndarray] = {}

    def scan(self, source: str, texts: pa.Array | Iterable[str]) -> None:
        hit = self.hits.setdefault(source, np.zeros((len(self.fields), self.items), dtype=bool))
        hashes, _ = ngram_hashes(texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else list(texts), self.n)
        for h in np.unique(hashes[np.isin(hashes, self.keys)]).tolist():
            for f, d in self.owner[h]:
                hit[f, d] = True

    def dirty(self) -> np.ndarray:
        if not self.hits:
            return np.zeros(self.items, dtype=bool)
        return np.logical_or.reduce([h.any(0) for h in self.hits.values()])

    def report(self) -> dict:
        out: dict = {"ngram": self.n, "items": self.items, "dirty": int(self.dirty().sum())}
        for f, name in enumerate(self.fields):
            out[name] = {"checked": int(self.checked[f].sum()), "too_short": int((~self.checked[f]).sum()),
                         **{f"dirty_{src}": int(h[f].sum()) for src, h in sorted(self.hits.items())}}
        return out
