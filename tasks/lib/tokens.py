"""Binary token files: `train.bin` / `val.bin` (token ids back to back, each document
followed by `<|endoftext|>`) and `meta.json` (dtype, vocabulary, counts per split).

    train, val, meta = token_files("data/tokens")     # numpy memmaps, checked against meta.json
    x, y = windows(train, batch=16, seq_len=256, gen=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.lib.errors import StageError

import numpy as np


class TokenFileError(StageError):
    """Token files that are missing, corrupt, or disagree with their meta.json."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_files(folder: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise TokenFileError(f"{meta_path}: missing (run the tokenize stage first)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        vocab = int(meta["vocab_size"])
        counts = {s: int(meta["splits"][s]["tokens"]) for s in ("train", "val")}
    except (ValueError, KeyError, TypeError) as err:
        raise TokenFileError(f"{meta_path}: not a valid token meta file ({type(err).__name__}: {err})") from None
    arrays = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise TokenFileError(f"{path}: missing (run the tokenize stage again)")
        size = path.stat().st_size
        if size != counts[split] * dtype.itemsize:
            raise TokenFileError(f"{path}: {size} bytes, but meta.json says {counts[split]} tokens of {dtype.name} "
                                 f"({counts[split] * dtype.itemsize} bytes): truncated or corrupt, run the tokenize stage again")
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype))
    for split, arr in zip(("train", "val"), arrays):
        top = max_token(arr)
        if top >= vocab:
            raise TokenFileError(f"{folder / (split + '.bin')}: holds token id {top}, but the vocabulary has {vocab} "
                                 "(meta.json): the file and the tokenizer do not belong together; run the tokenize stage again")
    meta["vocab_size"] = vocab
    return arrays[0], arrays[1], meta


def _done_with(data: np.ndarray, start: int, stop: int) -> None:
    """Tell the kernel this process is done with tokens [start, stop) of a memory-mapped file:
    their pages leave its resident set (a pass over a 10B-token file would otherwise keep
    20 GB mapped in, counted against the process even though the kernel could reclaim it)."""
    import mmap

    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    page = mmap.PAGESIZE
    offset = getattr(data, "offset", 0)
    lo = (offset + start * data.itemsize) // page * page
    hi = (offset + stop * data.itemsize) // page * page
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def max_token(data: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in a token file, read in chunks (memory stays flat at any size)."""
    top = -1
    for i in range(0, len(data), chunk):
        top = max(top, int(data[i : i + chunk].max()))
        _done_with(data, i, i + chunk)
    return top


def windows(data: np.ndarray, batch: int, seq_len: int, gen) -> tuple:
    """`batch` random windows of seq_len+1 tokens: inputs and next-token targets (int64)."""
    import torch

    if len(data) <= seq_len + 1:
        raise TokenFileError(f"only {len(data)} tokens: fewer than one window of {seq_len + 1}")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen).tolist()
    chunk = torch.from_numpy(np.stack([data[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]


def unigram_entropy(data: np.ndarray, vocab: int, chunk: int = 1 << 22) -> float:
    """Entropy (nats) of the token distribution: the loss of the best context-free model.
    Counted chunk by chunk, so memory is the counts and one chunk at any file size (casting the
    whole file at once took 10 bytes per token: 26 GB at 2.6B tokens)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(data), chunk):
        counts += np.bincount(np.asarray(data[i : i + chunk]), minlength=vocab)[:vocab]
        _done_with(data, i, i + chunk)
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
