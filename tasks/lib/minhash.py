"""MinHash signatures of word shingles for a whole shard at once, and LSH band keys.

    words = normalised_words(texts)                  # pyarrow ListArray of words per document
    sig = signatures(words, shingle=3, num_perm=112, seed=1)   # (N, num_perm) uint32, rensa
    keys = band_keys(sig, bands=14, rows=8)          # (N, bands) uint64: equal key = same bucket

Normalisation lower-cases, turns everything that is not a letter, digit or space into a
space and splits on whitespace (pyarrow compute, vectorised). Each distinct word of the
shard is hashed once (xxh3, 64-bit); a shingle's hash combines the hashes of its k words
in order (a polynomial in 64-bit arithmetic), computed for all shingles of all documents
with numpy; a document shorter than k words is one shingle of all its words. The MinHash
digests come from `rensa` (Rust) in one call over a flat buffer of shingle hashes. A
document with no word gets an empty-set signature (all 0xFFFFFFFF) and never matches.

LSH with b bands of r rows puts two documents in a common bucket with probability
1 - (1 - s^r)^b for Jaccard similarity s (the S-curve that `s_curve` computes).
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EMPTY = np.uint32(0xFFFFFFFF)
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: the polynomial's base


def normalised_words(texts: pa.Array) -> pa.ListArray:
    lowered = pc.utf8_lower(texts)
    cleaned = pc.replace_substring_regex(lowered, r"[^\p{L}\p{N}\s]+", " ")
    trimmed = pc.utf8_trim_whitespace(cleaned)
    trimmed = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)  # no words, not one empty word
    # RE2's \s is ASCII whitespace and every other non-word character became a space, so the
    # ASCII split (faster) splits exactly where a Unicode-aware one would
    return pc.ascii_split_whitespace(trimmed)


def normalised_text(words: pa.ListArray) -> pa.Array:
    return pc.binary_join(words, " ")


def word_hashes(words: pa.ListArray) -> np.ndarray:
    """A 64-bit hash of every word occurrence (flattened), each distinct word hashed once."""
    import xxhash

    flat = pc.list_flatten(words)
    if len(flat) == 0:
        return np.zeros(0, dtype=np.uint64)
    enc = flat.dictionary_encode()
    uniques = np.fromiter((xxhash.xxh3_64_intdigest(w) for w in enc.dictionary.cast(pa.binary()).to_pylist()), dtype=np.uint64,
                          count=len(enc.dictionary))
    return uniques[enc.indices.to_numpy(zero_copy_only=False)]


def shingle_hashes(words: pa.ListArray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat shingle hashes, row offsets) for all documents: n - k + 1 shingles for a
    document of n >= k words, 1 for 0 < n < k, none for n = 0."""
    h = word_hashes(words)
    offsets = words.offsets.to_numpy().astype(np.int64)
    n = np.diff(offsets)
    with np.errstate(over="ignore"):  # 64-bit wrap-around is the intended arithmetic
        # every window of k consecutive words of the flat array, documents ignored for now
        full = np.zeros(max(len(h) - k + 1, 0), dtype=np.uint64)
        for j in range(k):
            full = full * _MUL + h[j : len(h) - k + 1 + j]
        full ^= np.uint64(k)
        # keep the windows that lie inside one document: drop the last k - 1 starts of each
        keep = np.ones(len(full), dtype=bool)
        long_docs = np.flatnonzero(n >= k)
        for j in range(1, k):
            bad = offsets[long_docs + 1] - j
            keep[bad[bad < len(full)]] = False
        short = np.flatnonzero((n > 0) & (n < k))
        for j in range(k - 1):  # no window starts inside a short document: each would run into the next
            pos = offsets[short][j < n[short]] + j
            keep[pos[pos < len(full)]] = False
        windows = full[keep]
        # a document shorter than k words is one shingle of all its words
        counts = np.where(n >= k, n - k + 1, np.minimum(n, 1))
        out_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out = np.empty(int(out_off[-1]), dtype=np.uint64)
        is_long = np.repeat(n >= k, counts)
        out[is_long] = windows
        if len(short):
            acc = np.zeros(len(short), dtype=np.uint64)
            for j in range(k - 1):
                word = h[np.minimum(offsets[short] + j, len(h) - 1)]
                acc = acc * _MUL + np.where(j < n[short], word, np.uint64(0))
            out[out_off[short]] = acc ^ n[short].astype(np.uint64)
    return out, out_off.astype(np.uint64)


def signatures(words: pa.ListArray, shingle: int, num_perm: int, seed: int) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of the documents' word shingles."""
    import rensa

    hashes, offsets = shingle_hashes(words, shingle)
    if len(words) == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    if len(hashes) == 0:
        return np.full((len(words), num_perm), EMPTY, dtype=np.uint32)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)
    sig = np.fromiter(chain.from_iterable(matrix.to_rows()), dtype=np.uint32, count=len(words) * num_perm).reshape(len(words), num_perm)
    empty = np.diff(offsets.astype(np.int64)) == 0
    sig[empty] = EMPTY
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: documents whose r values of a band agree share that band's key."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm {sig.shape[1]}")
    keys = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(sig.shape[0], np.uint64(b + 1))
            for r in range(rows):
                acc = acc * _MUL + sig[:, b * rows + r].astype(np.uint64)
            keys[:, b] = acc ^ (acc >> np.uint64(29))
    return keys


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity: the share of equal MinHash values (row-wise for 2-D)."""
    eq = a == b
    both_empty = (a == EMPTY).all(-1) & (b == EMPTY).all(-1)
    return np.where(both_empty, 0.0, eq.mean(-1))


def s_curve(s: np.ndarray | float, bands: int, rows: int):
    """Probability that two documents of Jaccard similarity s share at least one bucket."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands
