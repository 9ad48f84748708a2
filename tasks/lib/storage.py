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
import math
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

from tasks.lib.errors import StageError
from tasks.lib.process import alive


DOC_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("meta", pa.string())]
)


# ------------------------------------------------------------------ atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def clean_stale(dest: Path) -> None:
    """Remove what a killed writer of `dest` left beside it: temporaries (`.name.tmp-PID-…`)
    of processes that are gone; a previous output moved aside (`.name.old-PID`) is put
    back when the kill came before the new one took its place."""
    for p in sorted(dest.parent.glob(f".{dest.name}.*-*")):
        kind, _, rest = p.name[len(dest.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not rest.split("-")[0].isdigit() or alive(int(rest.split("-")[0])):
            continue
        if kind == "old" and not dest.exists():
            os.replace(p, dest)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


_FAULTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Fault injection for the tests (tests/test_faults.py): with GPT_PIPELINE_FAULT=name:N
    the process SIGKILLs itself at the N-th replacement of an output named `name`, at the
    worst moment: the old output moved aside, the new one not yet in place."""
    spec = os.environ.get("GPT_PIPELINE_FAULT", "")
    if spec.rpartition(":")[0] == name:
        _FAULTS[name] = _FAULTS.get(name, 0) + 1
        if str(_FAULTS[name]) == spec.rpartition(":")[2]:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def check_output_paths(outputs: dict[str, Path], roots: Iterable[str], project: Path, tracked_ok: Iterable[str] = ()) -> None:
    """Every output, resolved through symlinks, lies inside one of the output folders (a root
    folder that is itself a symlink, e.g. data/ on a larger disk, is honoured; a link below it
    that leads elsewhere is not), and is neither a file git tracks nor a folder holding one.
    The outputs named in `tracked_ok` may be tracked files: a stage's metrics file, which
    dvc.yaml leaves to git (`cache: false`) so that a clone has the committed figures."""
    import subprocess

    project = project.resolve()
    allowed = {r: (project / r).resolve() for r in roots}
    res = subprocess.run(["git", "ls-files", "-z"], cwd=project, capture_output=True)
    tracked = {(project / f).resolve() for f in res.stdout.decode(errors="replace").split("\0") if f} if res.returncode == 0 else set()
    for name, p in outputs.items():
        full = (project / p).resolve()
        if not any(full == a or a in full.parents for a in allowed.values()):
            raise StageError(f"output '{name}' ({p}) resolves to {full}, outside the output folders "
                             f"({', '.join(f'{r} -> {a}' for r, a in allowed.items())}): a symlink leads out of them; fix the path or the link")
        inside = sorted(t for t in tracked if t == full or full in t.parents)
        if inside and not (name in tracked_ok and inside == [full]):
            raise StageError(f"output '{name}' ({p}) would replace {inside[0].relative_to(project)}, which git tracks: choose another path")


_NO_SPACE = {28: "the disk is full", 122: "the disk quota is exceeded", 30: "the file system is read-only", 13: "permission denied",
             1: "permission denied", 27: "the file is larger than this process may write (a file-size limit)"}
# ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EFBIG


@contextlib.contextmanager
def named_write_errors(dest: Path) -> Iterator[None]:
    """An OSError of the kinds a user must act on (disk full, read-only, no permission) while
    writing `dest` becomes one StageError that names the path and the cause."""
    import re

    try:
        yield
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        raise StageError(f"cannot write {dest}: {_NO_SPACE[err.errno]} ({err.strerror}); nothing was replaced: "
                         "free space or fix the folder's permissions, then rerun") from None
    except Exception as err:  # noqa: BLE001 - libraries in Rust (safetensors) report the OS error in their message only
        m = re.search(r"\(os error (\d+)\)", str(err))
        if not m or int(m.group(1)) not in _NO_SPACE:
            raise
        raise StageError(f"cannot write {dest}: {_NO_SPACE[int(m.group(1))]} ({str(err)[:120]}); nothing was replaced: "
                         "free space or fix the folder's permissions, then rerun") from None


def only_the_first_process(dest: Path) -> None:
    """Under torchrun every process runs the stage, but only rank 0 writes: two processes
    replacing the same output race. A write from another rank is a bug of the stage."""
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        raise RuntimeError(f"the process of rank {rank} tried to write {dest}: under several processes only rank 0 writes "
                           "(the stage must return after training on the others)")


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `dest` whole. A kill at any
    point leaves the previous `dest` (or none, if there was none), never a torn one; what it
    leaves beside it is cleaned by the next writer (`clean_stale`)."""
    dest = Path(dest)
    only_the_first_process(dest)
    with named_write_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary files
    try:
        with named_write_errors(dest):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    _fault_point(dest.name)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `dest` for writing; rename it over `dest` on success."""
    dest = Path(dest)
    only_the_first_process(dest)
    with named_write_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        encoding = None if "b" in mode else "utf-8"
        with named_write_errors(dest), open(tmp, mode, encoding=encoding) as fh:
            yield fh
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null: reports are always valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(json_safe(obj), fh, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
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
    """Writes rows into `<folder>/<prefix>-00000.parquet`, `-00001...` of `shard_docs` rows."""

    def __init__(self, folder: Path, shard_docs: int = 5000, prefix: str = "part"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_docs, self.prefix = shard_docs, prefix
        self.buffer: list[dict] = []
        self.shards = 0
        self.rows = 0
        self.names: list[str] = []

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.shards > 0:
            return
        table = pa.Table.from_pylist(self.buffer, schema=DOC_SCHEMA)
        name = f"{self.prefix}-{self.shards:05d}.parquet"
        pq.write_table(table, self.folder / name, compression="zstd")
        self.names.append(name)
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
        rows.extend(read_shard(f))
    return rows


def read_shard(path: Path) -> list[dict]:
    return read_shard_table(path, None).to_pylist()


def shard_rows(path: Path) -> int:
    """The number of documents in a shard, from its footer (nothing else is read)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{path}: not a readable document shard ({str(err)[:200]}); rerun the stage that wrote it") from None


def read_shard_table(path: Path, columns: list[str] | None) -> pa.Table:
    """One document shard (or some of its columns) as an Arrow table."""
    # ParquetFile, not read_table: read_table loads pyarrow.dataset, which imports pandas
    # (over a second of every worker's start) and reads columns a caller did not ask for
    if columns and not set(columns) <= set(DOC_SCHEMA.names):
        raise ValueError(f"unknown document columns {sorted(set(columns) - set(DOC_SCHEMA.names))}")
    try:
        with pq.ParquetFile(path) as pf:
            found = [(f.name, str(f.type)) for f in pf.schema_arrow]
            if found != [(f.name, str(f.type)) for f in DOC_SCHEMA]:  # names, order and types; nullability aside
                raise StageError(f"{path}: not a document shard (columns {', '.join(f'{n}: {t}' for n, t in found)}; "
                                 f"expected {', '.join(f'{f.name}: {f.type}' for f in DOC_SCHEMA)}); rerun the stage that wrote it")
            table = pf.read(columns=columns or DOC_SCHEMA.names)
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"{path}: not a readable document shard ({str(err)[:200]}); rerun the stage that wrote it") from None
    for name in ("id", "text", "source"):
        if name in table.column_names and table.column(name).null_count:
            raise StageError(f"{path}: {table.column(name).null_count} document(s) without a {name} (null); rerun the stage that wrote it")
    return table


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
