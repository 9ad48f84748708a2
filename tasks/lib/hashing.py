"""Stable hashing: pseudo-random splits decided by an id, and content hashes.

`unit_interval("doc-1", salt="val")` maps an id to [0, 1) the same way on every machine and
run, so a document stays in its split when others are added; the salt makes two splits
independent. `content_hash(paths)` hashes the bytes (and relative names) of files and folders:
resume fingerprints use it, so a retrained input with the same size or the same score is
still a different input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def unit_interval(key: str, salt: str = "") -> float:
    h = int.from_bytes(hashlib.sha256((salt + key).encode()).digest()[:8], "big")
    return h / 2**64


def in_fraction(key: str, fraction: float, salt: str = "") -> bool:
    return unit_interval(key, salt) < fraction


def file_hash(path: str | Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the relative names and bytes of every file under the given paths
    (files or folders; hidden temporaries skipped), in sorted order. A missing path hashes
    as missing, so an input that appears changes the hash."""
    h = hashlib.sha256()
    for i, p in enumerate(map(Path, paths)):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)) if p.is_dir() else []
        h.update(f"#{i}:{len(files)}\n".encode())
        for f in files:
            h.update(f"{f.relative_to(p) if f != p else f.name}\n".encode())
            file_hash(f, h)
    return h.hexdigest()
