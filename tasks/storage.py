"""Storage shared by the stages: atomic outputs, document shards, progress.

Documents travel between data stages as Parquet shards with the columns
`id` (stable: `<source>/<original id>`), `source`, `text`, `meta` (a JSON string:
URL, title, licence, ground truth of generated documents, ...).

Outputs are written atomically: into a temporary sibling that is renamed over the
destination only when complete, so a failed or killed stage never leaves a half-written
output behind and an earlier complete output is not lost before the new one exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm


class StageError(RuntimeError):
    """A problem with a stage's inputs that the user must fix (missing file, empty source, ...)."""


DOC_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("meta", pa.string())]
)


# ------------------------------------------------------------------ atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `dest` whole."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary files
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `dest` for writing; rename it over `dest` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


# ------------------------------------------------------------------ document shards
def doc_row(doc_id: str, source: str, text: str, meta: dict[str, Any] | None = None) -> dict:
    return {
        "id": doc_id,
        "source": source,
        "text": text,
        "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False),
    }


class ShardWriter:
    """Writes rows into `<folder>/part-00000.parquet`, `part-00001...` of `shard_docs` rows."""

    def __init__(self, folder: Path, shard_docs: int = 5000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_docs = shard_docs
        self.buffer: list[dict] = []
        self.shards = 0
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.shards > 0:
            return
        table = pa.Table.from_pylist(self.buffer, schema=DOC_SCHEMA)
        pq.write_table(table, self.folder / f"part-{self.shards:05d}.parquet", compression="zstd")
        self.rows += len(self.buffer)
        self.shards += 1
        self.buffer = []

    def close(self) -> int:
        self.flush()  # always at least one (possibly empty) shard: downstream can read it
        return self.rows


def write_docs(folder: Path, rows: Iterable[dict], shard_docs: int = 5000) -> int:
    writer = ShardWriter(folder, shard_docs)
    for row in rows:
        writer.add(row)
    return writer.close()


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{folder}: input folder does not exist (run the upstream stage first)")
    return sorted(folder.glob("part-*.parquet"))


def read_docs(folder: str | Path) -> list[dict]:
    """All rows of a shard folder, in shard order (deterministic)."""
    rows: list[dict] = []
    for f in shard_files(folder):
        rows.extend(pq.read_table(f, schema=DOC_SCHEMA).to_pylist())
    return rows


def source_folders(root: str | Path) -> dict[str, Path]:
    """`{source: folder}` for a stage output laid out as `<root>/<source>/part-*.parquet`."""
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"{root}: input folder does not exist (run the upstream stage first)")
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


# ------------------------------------------------------------------ progress
def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "doc"):
    """A progress bar with rate and ETA. When stderr is not a terminal (DVC, Prefect logs),
    it prints a line at most every 10 s instead of redrawing."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        mininterval=0.5 if interactive else 10.0,
        ascii=not interactive,
        dynamic_ncols=interactive,
        file=sys.stderr,
    )
