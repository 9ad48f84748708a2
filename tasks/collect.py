"""collect: read every source listed in `params.yaml` into Parquet shards.

    python -m tasks.collect            # what `dvc repro collect` runs

Source kinds: `builtin` (the offline corpus of tasks/builtin.py), `hf`
(`datasets.load_dataset`: a hub dataset or local json/parquet/text files) and `files` (local
globs of .jsonl/.json/.parquet/.txt). Output: `data/raw/<source>/part-*.parquet` with columns
id, source, text, meta. Documents with invalid UTF-8, empty or oversized text, a missing text
field or a repeated id are dropped and counted per reason; a source that yields no document
at all stops the stage with an error naming it.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import builtin
from tasks.config import BuiltinSource, Collect, FilesSource, HFSource, Params
from tasks.storage import ShardWriter, StageError, atomic_dir, doc_row, progress

STAGE = "collect"
PARAMS = ("seed", "collect")
INPUTS: tuple[str, ...] = ()
OUTPUTS = ("raw",)

Record = tuple[str, Any, dict]  # (original id, text as str or bytes, meta); text None = unreadable


# --------------------------------------------------------------------------- readers
def read_builtin(src: BuiltinSource, cfg: Collect, seed: int) -> Iterator[Record]:
    if src.corpus == "python_docs":
        yield from builtin.python_docs(src.limit)
    elif src.corpus == "python_code":
        yield from builtin.python_code(src.limit, seed)
    else:
        # Cross-source duplicates point at the reference documents collected in this run.
        ref = next((s for s in cfg.sources if isinstance(s, BuiltinSource) and s.corpus == "python_docs"), None)
        reference = [(f"{ref.name}/{rid}", text) for rid, text, _ in builtin.python_docs(ref.limit)] if ref else None
        for pid, text, meta in builtin.synthetic_crawl(src.num_docs, src.crawl_mix, seed, reference):
            dup = meta["duplicate_of"]
            if dup and dup.startswith("@"):
                meta = {**meta, "duplicate_of": f"{src.name}/{dup[1:]}"}
            yield pid, text, meta


def read_hf(src: HFSource) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.config_name, data_files=src.data_files, split=src.split, streaming=src.streaming)
    except FileNotFoundError as err:
        raise StageError(f"source '{src.name}': dataset or files not found: {err}") from None
    except Exception as err:  # datasets raises many types; the user needs the message, not the stack
        raise StageError(f"source '{src.name}': load_dataset({src.path!r}) failed: {type(err).__name__}: {err}") from None
    for i, rec in enumerate(ds):
        if src.limit is not None and i >= src.limit:
            return
        if src.text_field not in rec:
            raise StageError(f"source '{src.name}': no field '{src.text_field}' in records (fields: {sorted(rec)}); set text_field")
        rid = str(rec[src.id_field]) if src.id_field and rec.get(src.id_field) is not None else str(i)
        meta = {k: v for k, v in rec.items() if k != src.text_field and isinstance(v, (str, int, float, bool)) and len(str(v)) < 500}
        yield rid, rec[src.text_field], {**meta, "hf_path": src.path, "split": src.split}


def read_files(src: FilesSource) -> Iterator[Record]:
    paths = sorted({p for g in src.globs for p in glob.glob(g, recursive=True) if Path(p).is_file()})
    if not paths:
        raise StageError(f"source '{src.name}': no file matches {src.globs}")
    n = 0
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix in (".jsonl", ".json"):
            records = _jsonl(path, src)
        elif suffix == ".parquet":
            records = _parquet(path, src)
        elif suffix in (".txt", ".md", ".text"):
            records = iter([(path, Path(path).read_bytes(), {"path": path})])
        else:
            raise StageError(f"source '{src.name}': {path}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .txt)")
        for rec in records:
            if src.limit is not None and n >= src.limit:
                return
            n += 1
            yield rec


def _jsonl(path: str, src: FilesSource) -> Iterator[Record]:
    with open(path, "rb") as fh:
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
            if not isinstance(obj, dict) or src.text_field not in obj:
                yield rid, None, {"reason": "missing_text_field"}
                continue
            if src.id_field and obj.get(src.id_field) is not None:
                rid = str(obj[src.id_field])
            yield rid, obj[src.text_field], {"path": path, "line": lineno}


def _parquet(path: str, src: FilesSource) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
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


def records(src, cfg: Collect, seed: int) -> Iterator[Record]:
    if isinstance(src, BuiltinSource):
        return read_builtin(src, cfg, seed)
    if isinstance(src, HFSource):
        return read_hf(src)
    return read_files(src)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.collect
    metrics: dict[str, Any] = {"sources": {}}
    with atomic_dir(outputs["raw"]) as tmp:
        for src in cfg.sources:
            writer = ShardWriter(tmp / src.name, cfg.shard_docs)
            dropped: Counter[str] = Counter()
            seen: set[str] = set()
            kept_bytes = 0
            for rid, text, meta in progress(records(src, cfg, params.seed), desc=f"collect {src.name}"):
                clean, reason = check_text(text, cfg)
                reason = meta.get("reason", reason) if clean is None else None
                doc_id = f"{src.name}/{rid}"
                if clean is not None and doc_id in seen:
                    reason = "duplicate_id"
                if reason:
                    dropped[reason] += 1
                    continue
                seen.add(doc_id)
                kept_bytes += len(clean.encode("utf-8"))
                writer.add(doc_row(doc_id, src.name, clean, {**meta, "role": src.role}))
            kept = writer.close()
            if kept == 0:
                raise StageError(f"source '{src.name}' yielded no usable document (dropped: {dict(dropped) or 'none read'})")
            metrics["sources"][src.name] = {"docs": kept, "bytes": kept_bytes, "dropped": dict(sorted(dropped.items())), "role": src.role}
    metrics["docs"] = sum(s["docs"] for s in metrics["sources"].values())
    metrics["bytes"] = sum(s["bytes"] for s in metrics["sources"].values())
    metrics["dropped"] = sum(sum(s["dropped"].values()) for s in metrics["sources"].values())
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
