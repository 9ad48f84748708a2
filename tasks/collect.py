"""collect: read every source listed in `params.yaml` into Parquet shards.

    python -m tasks.collect            # what `dvc repro collect` runs

Source kinds: `builtin` (the offline corpora of tasks/lib/corpora.py), `hf`
(`datasets.load_dataset`: a hub dataset or local json/parquet/text files), `files` (globs of
.jsonl/.json/.parquet/.txt, local or remote through fsspec; .jsonl.gz, .jsonl.zst, .txt.gz ...
decompressed as read) and `warc` (web archives, WARC or WET, local or remote: HTML responses
turned into main text, tasks/lib/webarchive.py). Output: `data/raw/<source>/part-*.parquet`
with columns id, source, text, meta. Documents with invalid UTF-8, empty or oversized text, a
missing text field or a repeated id, and archive records that are not documents (requests,
non-200 or non-HTML responses, undecodable pages), are dropped and counted per reason; a
source that yields no document at all, an archive that is not one or is cut short, and a
remote store that does not answer stop the stage with an error naming them.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import BuiltinSource, Collect, FilesSource, HFSource, Params, WarcSource
from tasks.lib import corpora
from tasks.lib.datafiles import RemoteError, file_kind, is_remote, list_files, open_binary, open_raw
from tasks.lib.errors import StageError
from tasks.lib.storage import ShardWriter, atomic_dir, doc_row

STAGE = "collect"
PARAMS = ("seed", "collect")
UNTRACKED = ("executor",)
INPUTS = ("sources",)  # the fingerprint of the sources: new data reruns collect
OUTPUTS = ("raw",)

Record = tuple[str, Any, dict]  # (original id, text as str or bytes, meta); text None = unreadable


# --------------------------------------------------------------------------- readers
def read_builtin(src: BuiltinSource, cfg: Collect, seed: int) -> Iterator[Record]:
    if src.corpus == "python_docs":
        yield from corpora.python_docs(src.limit)
    elif src.corpus == "python_code":
        yield from corpora.python_code(src.limit, seed)
    elif src.corpus == "web_archive":  # real HTML through the same WARC reader as a `warc` source
        from tasks.lib.webarchive import read_warc, warc_bytes, web_pages

        data = warc_bytes(page for page, _ in web_pages(src.limit))
        yield from read_warc(io.BytesIO(data), "the built-in web archive")
    else:
        # Cross-source duplicates point at the reference documents collected in this run.
        ref = next((s for s in cfg.sources if isinstance(s, BuiltinSource) and s.corpus == "python_docs"), None)
        reference = [(f"{ref.name}/{rid}", text) for rid, text, _ in corpora.python_docs(ref.limit)] if ref else None
        for pid, text, meta in corpora.synthetic_crawl(src.num_docs, src.crawl_mix.model_dump(), seed, reference):
            dup = meta["duplicate_of"]
            if dup and dup.startswith("@"):
                meta = {**meta, "duplicate_of": f"{src.name}/{dup[1:]}"}
            yield pid, text, meta


def read_hf(src: HFSource) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.config_name, data_files=src.data_files, split=src.split,
                                   revision=src.revision, streaming=src.streaming)
    except FileNotFoundError as err:
        raise StageError(f"source '{src.name}': dataset or files not found: {err}") from None
    except Exception as err:  # datasets raises many types; the user needs the message, not the stack
        raise StageError(f"source '{src.name}': load_dataset({src.path!r}) failed: {type(err).__name__}: {err}") from None
    records = iter(ds)
    i = -1
    while True:
        i += 1
        if src.limit is not None and i >= src.limit:
            return
        try:
            rec = next(records)
        except StopIteration:
            return
        except Exception as err:  # a corrupt file met while streaming: name it, no traceback
            raise StageError(f"source '{src.name}': reading {src.path!r} failed at record {i}: {type(err).__name__}: {str(err)[:300]}") from None
        if src.text_field not in rec:
            raise StageError(f"source '{src.name}': no field '{src.text_field}' in records (fields: {sorted(rec)}); set text_field")
        rid = str(rec[src.id_field]) if src.id_field and rec.get(src.id_field) is not None else str(i)
        meta = {k: v for k, v in rec.items() if k != src.text_field and isinstance(v, (str, int, float, bool)) and len(str(v)) < 500}
        yield rid, rec[src.text_field], {**meta, "hf_path": src.path, "split": src.split}


def matching_files(src: FilesSource | WarcSource) -> list[str]:
    try:
        paths = [f["path"] for f in list_files(src.globs, src.storage_options)]
    except RemoteError as err:
        raise StageError(f"source '{src.name}': {err}") from None
    if not paths:
        raise StageError(f"source '{src.name}': no file matches {src.globs}")
    return paths


def read_files(src: FilesSource, paths: list[str] | None = None) -> Iterator[Record]:
    from zstandard import ZstdError

    paths = paths or matching_files(src)
    n = 0
    for path in paths:
        suffix = file_kind(path)
        if suffix in (".jsonl", ".json"):
            records = _jsonl(path, src)
        elif suffix == ".parquet":
            records = _parquet(path, src)
        elif suffix in (".txt", ".md", ".text"):
            records = _whole_file(path, src)
        else:
            raise StageError(f"source '{src.name}': {path}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet "
                             "or .txt, the text ones optionally .gz or .zst; web archives are read by a `warc` source)")
        try:
            for rec in records:
                if src.limit is not None and n >= src.limit:
                    return
                n += 1
                yield rec
        except RemoteError as err:
            raise StageError(f"source '{src.name}': {err}; nothing was written") from None
        except (EOFError, OSError, ZstdError) as err:  # truncated or corrupt compressed file: the whole input is bad
            if isinstance(err, OSError) and err.errno is not None:
                raise
            raise StageError(f"source '{src.name}': {path}: not a readable {Path(path).suffix} file ({err}); "
                             "nothing was written") from None


def read_warcs(src: WarcSource, paths: list[str] | None = None) -> Iterator[Record]:
    from tasks.lib.webarchive import ArchiveError, read_warc

    n = 0
    for path in paths or matching_files(src):
        try:
            # a local file goes to FastWARC by name (its own fast reader), a remote one as a stream
            stream = open_raw(path, src.storage_options) if is_remote(path) else path
            for rid, text, meta in read_warc(stream, path, src.extractor):
                if src.limit is not None and n >= src.limit:
                    return
                n += 1
                yield rid, text, ({**meta, "path": path} if text is not None else meta)
        except (ArchiveError, RemoteError) as err:
            raise StageError(f"source '{src.name}': {err}; nothing was written") from None


def _whole_file(path: str, src: FilesSource) -> Iterator[Record]:
    with open_binary(path, src.storage_options) as fh:
        yield path, fh.read(), {"path": path}


def _jsonl(path: str, src: FilesSource) -> Iterator[Record]:
    with open_binary(path, src.storage_options) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rid = f"{path}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield rid, b"\xff", {}  # counted as invalid_utf8 below
                continue
            except json.JSONDecodeError:
                yield rid, None, {"reason": "invalid_json"}
                continue
            except RecursionError:  # nested deeper than Python's parser goes: a broken or hostile record
                yield rid, None, {"reason": "json_too_deep"}
                continue
            if not isinstance(obj, dict) or src.text_field not in obj:
                yield rid, None, {"reason": "missing_text_field"}
                continue
            if src.id_field and obj.get(src.id_field) is not None:
                rid = str(obj[src.id_field])
            yield rid, obj[src.text_field], {"path": path, "line": lineno}


def _parquet(path: str, src: FilesSource) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_binary(path, src.storage_options) as fh:
            table = pq.read_table(fh)
    except RemoteError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise StageError(f"source '{src.name}': {path}: not a readable Parquet file ({err})") from None
    if src.text_field not in table.column_names:
        raise StageError(f"source '{src.name}': {path} has no column '{src.text_field}' (columns: {table.column_names})")
    texts = table.column(src.text_field).to_pylist()
    ids = table.column(src.id_field).to_pylist() if src.id_field and src.id_field in table.column_names else None
    for i, text in enumerate(texts):
        yield (str(ids[i]) if ids else f"{path}:{i}"), text, {"path": path, "row": i}


# --------------------------------------------------------------------------- validation
def check_text(text: Any, cfg: Collect) -> tuple[str | None, str | None]:
    """(clean text, None) or (None, reason)."""
    if text is None:
        return None, "unreadable"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(text, str):
        return None, "not_text"
    try:
        text.encode("utf-8")  # lone surrogates (e.g. from JSON "\ud800") are not valid UTF-8
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    text = text.replace("\r\n", "\n").replace("\x00", "")
    if not text.strip():
        return None, "empty"
    if len(text) < cfg.min_chars:
        return None, "too_short"
    if len(text) > cfg.max_chars:
        return None, "too_large"
    return text, None


def records(src, cfg: Collect, seed: int, path: str | None = None) -> Iterator[Record]:
    if isinstance(src, BuiltinSource):
        return read_builtin(src, cfg, seed)
    if isinstance(src, HFSource):
        return read_hf(src)
    if isinstance(src, WarcSource):
        return read_warcs(src, [path] if path else None)
    return read_files(src, [path] if path else None)


@dataclass(frozen=True)
class PartTask:
    source: Any  # the source's config
    cfg: Collect
    seed: int
    folder: str
    prefix: str  # shard names: <prefix>-00000.parquet, ...
    path: str | None  # one file of a `files` source, or None: the whole source


def collect_part(task: PartTask) -> dict[str, Any]:
    """Read one part of a source (a file, or the whole source), write its shards; return
    counts, drop reasons and the 64-bit hashes of the kept ids, in order."""
    import xxhash

    src, cfg = task.source, task.cfg
    writer = ShardWriter(Path(task.folder), cfg.shard_docs, prefix=task.prefix)
    dropped: Counter[str] = Counter()
    seen: set[int] = set()
    hashes: list[int] = []
    kept_bytes = 0
    for rid, text, meta in records(src, cfg, task.seed, task.path):
        clean, reason = check_text(text, cfg)
        reason = meta.get("reason", reason) if clean is None else None
        doc_id = f"{src.name}/{rid}"
        h = xxhash.xxh3_64_intdigest(doc_id.encode())
        if clean is not None and h in seen:
            reason = "duplicate_id"
        if reason:
            dropped[reason] += 1
            continue
        seen.add(h)
        hashes.append(h)
        kept_bytes += len(clean.encode("utf-8"))
        writer.add(doc_row(doc_id, src.name, clean, {**meta, "role": src.role}))
    writer.close()
    return {"docs": len(hashes), "bytes": kept_bytes, "dropped": dict(dropped), "ids": np.array(hashes, dtype=np.uint64),
            "shards": writer.names}


def drop_repeated_ids(folder: Path, parts: list[dict], shard_docs: int) -> int:
    """An id seen in an earlier part is dropped from the later ones; returns how many."""
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.zeros(0, np.uint64)
    _, first = np.unique(ids, return_index=True)
    repeated = np.setdiff1d(np.arange(len(ids)), first)
    if len(repeated) == 0:
        return 0
    start = 0
    for p in parts:
        mine = repeated[(repeated >= start) & (repeated < start + p["docs"])] - start
        for k, name in enumerate(p["shards"]):
            rows = mine[(mine >= k * shard_docs) & (mine < (k + 1) * shard_docs)] - k * shard_docs
            if len(rows):
                table = pq.read_table(folder / name)
                keep = np.ones(table.num_rows, dtype=bool)
                keep[rows] = False
                pq.write_table(table.filter(pa.array(keep)), folder / name, compression="zstd")
        start += p["docs"]
    return int(len(repeated))


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.executor import Executor

    cfg, ex = params.collect, params.executor
    metrics: dict[str, Any] = {"sources": {}}
    with atomic_dir(outputs["raw"]) as tmp, Executor(ex.kind, ex.workers, ex.ray_address, desc="collect") as pool:
        for src in cfg.sources:
            folder = tmp / src.name
            if isinstance(src, (FilesSource, WarcSource)) and src.limit is None:  # one task per file, in parallel
                files = matching_files(src)
                tasks = [PartTask(src, cfg, params.seed, str(folder), f"part-{i:05d}", f) for i, f in enumerate(files)]
            else:  # a limit counts across files; builtin and hub sources are one stream
                tasks = [PartTask(src, cfg, params.seed, str(folder), "part", None)]
            parts = pool.map(collect_part, tasks, unit="file")
            dropped: Counter[str] = Counter()
            for p in parts:
                dropped.update(p["dropped"])
            repeated = drop_repeated_ids(folder, parts, cfg.shard_docs)
            if repeated:
                dropped["duplicate_id"] += repeated
            kept = sum(p["docs"] for p in parts) - repeated
            if kept == 0:
                raise StageError(f"source '{src.name}' yielded no usable document (dropped: {dict(dropped) or 'none read'})")
            metrics["sources"][src.name] = {"docs": kept, "bytes": sum(p["bytes"] for p in parts), "dropped": dict(sorted(dropped.items())),
                                            "role": src.role}
    metrics["docs"] = sum(s["docs"] for s in metrics["sources"].values())
    metrics["bytes"] = sum(s["bytes"] for s in metrics["sources"].values())
    metrics["dropped"] = sum(sum(s["dropped"].values()) for s in metrics["sources"].values())
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
