"""MinHash signatures of word shingles for a whole shard at once, and LSH band keys.

    norm = normalise(texts)                          # pyarrow strings: "lower cased words joined by one space"
    hashes, offsets = word_hashes(norm)              # 64-bit hash per word, per-document offsets
    sig = signatures(hashes, offsets, shingle=3, num_perm=112, seed=1)   # (N, num_perm) uint32
    keys = band_keys(sig, bands=14, rows=8)          # (N, bands) uint64: equal key = same bucket
    exact = word_keys(hashes, offsets)               # (N, 2) uint64: 128-bit key of the normalised text
    prefix_keys(texts, [5, 0])                       # the key of each text's first n words, as ints

Normalisation lower-cases each character (the first character of Python's `str.lower`),
keeps letters and digits (Unicode categories L* and N*, i.e. `str.isalnum`) and treats every
other character as a word break; words are joined by one space. A word's hash is FNV-1a
over its UTF-8 bytes with a murmur3 finaliser; a text's 128-bit key is two polynomials over
its word hashes. A shingle's hash combines the hashes of its k words in order (a polynomial
in 64-bit arithmetic); a document shorter than k words is one shingle of all its words. Permutation p
of the MinHash is the multiply-shift hash (a_p x + b_p mod 2^64) >> 32 with a_p odd, drawn
from the seed. A document with no word gets an empty-set signature (all 0xFFFFFFFF) and
never matches.

The per-byte and per-shingle loops are compiled with numba (cached on disk beside this file),
so a shard is one pass over its text bytes and one over its shingles, with no Python object
per word or per document; this is what makes the map over 20x the datasketch loop
(bench/dedup_speed.py).

LSH with b bands of r rows puts two documents in a common bucket with probability
1 - (1 - s^r)^b for Jaccard similarity s (the S-curve that `s_curve` computes).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pyarrow as pa

EMPTY = np.uint32(0xFFFFFFFF)
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: the shingle polynomial's base
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_BASIS = np.uint64(0xCBF29CE484222325)
_SEED2 = np.uint64(0x2545F4914F6CDD1D)  # second seed of the 128-bit text key
_TABLES: tuple[np.ndarray, np.ndarray] | None = None
_PLANES = 0x40000  # no cased, letter or digit character lies above plane 3 (tested)


def char_tables() -> tuple[np.ndarray, np.ndarray]:
    """(lower, is_word) indexed by code point, built once per process (~60 ms)."""
    global _TABLES
    if _TABLES is None:
        lower = np.arange(0x110000, dtype=np.uint32)
        word = np.zeros(0x110000, dtype=np.bool_)
        chars = [chr(c) for c in range(_PLANES)]
        lower[:_PLANES] = np.fromiter((ord(ch.lower()[0]) for ch in chars), dtype=np.uint32, count=_PLANES)
        word[:_PLANES] = np.fromiter((ch.isalnum() for ch in chars), dtype=np.bool_, count=_PLANES)
        _TABLES = lower, word
    return _TABLES


def _arrow_parts(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes, int64 offsets) of a string array, nulls as empty strings. The bytes end
    where the last string ends (not at the buffer's padding): the kernels size their output
    from this length, and numba does not check bounds."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.cast(pa.large_string())
    if texts.null_count:  # only then: making the "" scalar imports pandas (a second of a worker's start)
        texts = texts.fill_null("")
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    if data is None or len(offsets) == 0:
        return np.zeros(0, np.uint8), offsets
    return np.frombuffer(data, dtype=np.uint8)[: int(offsets[-1])], offsets


@nb.njit(cache=True)
def _put_utf8(out, n, cp):
    if cp < 0x80:
        out[n] = cp
        return n + 1
    if cp < 0x800:
        out[n] = 0xC0 | (cp >> 6)
        out[n + 1] = 0x80 | (cp & 0x3F)
        return n + 2
    if cp < 0x10000:
        out[n] = 0xE0 | (cp >> 12)
        out[n + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[n + 2] = 0x80 | (cp & 0x3F)
        return n + 3
    out[n] = 0xF0 | (cp >> 18)
    out[n + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[n + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[n + 3] = 0x80 | (cp & 0x3F)
    return n + 4


@nb.njit(cache=True)
def _normalise(data, offsets, lower, word):
    n_docs = len(offsets) - 1
    # a lowered character takes at most one byte more than itself (2 -> 3 bytes), so 1.5x + 4
    out = np.empty(len(data) + len(data) // 2 + 4, dtype=np.uint8)
    out_off = np.empty(n_docs + 1, dtype=np.int64)
    n = 0
    for d in range(n_docs):
        out_off[d] = n
        start = n
        gap = False  # a break seen since the last word character
        i, end = offsets[d], offsets[d + 1]
        while i < end:
            b = np.int64(data[i])
            if b < 0x80:  # ASCII, most bytes of most text: no decoding
                cp = b
                i += 1
            else:
                # the lead byte says how long the character is; a lead that is not one, or a
                # character cut off or with a byte that is not a continuation, is one stray
                # byte and counts as a break (strings are validated UTF-8 upstream: defence)
                w = 0 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 0
                if w == 0 or i + w > end:
                    w = 0
                else:
                    for t in range(1, w):
                        if (np.int64(data[i + t]) & 0xC0) != 0x80:
                            w = 0
                            break
                if w == 2:
                    cp = ((b & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F)
                elif w == 3:
                    cp = ((b & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F)
                elif w == 4:
                    cp = ((b & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12) | ((np.int64(data[i + 2]) & 0x3F) << 6) | (np.int64(data[i + 3]) & 0x3F)
                else:
                    cp, w = 0x20, 1
                i += w
            if cp < len(word) and word[cp]:
                if gap and n > start:
                    out[n] = 0x20
                    n += 1
                gap = False
                n = _put_utf8(out, n, np.int64(lower[cp]))
            else:
                gap = True
    out_off[n_docs] = n
    return out[:n].copy(), out_off


def normalise(texts: pa.Array) -> pa.Array:
    """The normalised text of every document: lower-cased words joined by one space."""
    lower, word = char_tables()
    data, offsets = _arrow_parts(texts)
    out, out_off = _normalise(data, offsets, lower, word)
    return pa.LargeStringArray.from_buffers(len(out_off) - 1, pa.py_buffer(out_off), pa.py_buffer(out))


@nb.njit(cache=True, inline="always")
def _fmix(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@nb.njit(cache=True)
def _word_hashes(data, offsets):
    n_docs = len(offsets) - 1
    hashes = np.empty(len(data) // 2 + n_docs + 1, dtype=np.uint64)  # a word and its space: >= 2 bytes
    woff = np.empty(n_docs + 1, dtype=np.int64)
    nw = 0
    for d in range(n_docs):
        woff[d] = nw
        h = _FNV_BASIS
        inword = False
        for i in range(offsets[d], offsets[d + 1]):
            b = np.uint64(data[i])
            if b == 0x20:
                if inword:  # normalised text has no doubled space; other text may
                    hashes[nw] = _fmix(h)
                    nw += 1
                h = _FNV_BASIS
                inword = False
            else:
                h = (h ^ b) * _FNV_PRIME
                inword = True
        if inword:
            hashes[nw] = _fmix(h)
            nw += 1
    woff[n_docs] = nw
    return hashes[:nw].copy(), woff


def word_hashes(norm: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word, flattened; int64 offsets of each document's words)."""
    return _word_hashes(*_arrow_parts(norm))


@nb.njit(cache=True)
def _word_keys(hashes, woff):
    n_docs = len(woff) - 1
    keys = np.empty((n_docs, 2), dtype=np.uint64)
    for d in range(n_docs):
        h1 = _FNV_BASIS
        h2 = _SEED2
        for j in range(woff[d], woff[d + 1]):  # two polynomials over the word hashes
            h1 = h1 * _MUL + hashes[j]
            h2 = (h2 ^ hashes[j]) * _FNV_PRIME
        n = np.uint64(woff[d + 1] - woff[d])
        keys[d, 0] = _fmix(h1 ^ n)
        keys[d, 1] = _fmix(h2 + n)
    return keys


def word_keys(hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(N, 2) uint64: a 128-bit key of each document's word sequence (from `word_hashes`)."""
    return _word_keys(hashes, np.asarray(offsets, dtype=np.int64))


def text_keys(norm: pa.Array) -> np.ndarray:
    """(N, 2) uint64: a 128-bit key of each normalised text (equal texts, equal keys)."""
    return word_keys(*word_hashes(norm))


def prefix_keys(texts: pa.Array, lengths: list[int] | tuple[int, ...]) -> list[int]:
    """The text key (as one 128-bit int, high half first) of the first `length` normalised
    words of each text: equal to the key of a document whose whole text is that prefix."""
    norm = normalise(texts).to_pylist()
    keys = text_keys(pa.array([" ".join(t.split(" ")[:n]) for t, n in zip(norm, lengths)], pa.string()))
    return [int(hi) << 64 | int(lo) for hi, lo in keys]


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the num_perm multiply-shift permutations: a odd, both uint64."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, num_perm, dtype=np.uint64)
    return a, b


@nb.njit(cache=True)
def _signatures(hashes, woff, k, a, b):
    n_docs = len(woff) - 1
    perms = len(a)
    sig = np.full((n_docs, perms), np.uint32(0xFFFFFFFF))
    best = np.empty(perms, dtype=np.uint64)
    for d in range(n_docs):
        s, m = woff[d], woff[d + 1] - woff[d]
        if m == 0:
            continue
        best[:] = np.uint64(0xFFFFFFFFFFFFFFFF)
        width = k if m >= k else m  # a document shorter than k words: one shingle of them all
        for j in range(m - width + 1):
            x = np.uint64(0)
            for t in range(width):
                x = x * _MUL + hashes[s + j + t]
            x = _fmix(x ^ np.uint64(width))
            for p in range(perms):  # compiled to SIMD: this loop is where the time goes
                v = a[p] * x + b[p]
                if v < best[p]:
                    best[p] = v
        for p in range(perms):
            sig[d, p] = np.uint32(best[p] >> np.uint64(32))
    return sig


def signatures(hashes: np.ndarray, offsets: np.ndarray, shingle: int, num_perm: int, seed: int) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of the documents' word shingles."""
    if shingle < 1 or num_perm < 1:
        raise ValueError(f"shingle ({shingle}) and num_perm ({num_perm}) must be at least 1")
    a, b = permutations(num_perm, seed)
    return _signatures(hashes, np.asarray(offsets, dtype=np.int64), shingle, a, b)


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
