"""Data files where they lie: local paths or remote URLs (s3://, gs://, https:// ... through
fsspec), listed by glob and opened as byte streams, decompressing `.gz` and `.zst` as read.

    from tasks.lib.datafiles import list_files, open_binary, file_kind

Used by the `sources` stage (fingerprints) and `collect` (reading). A remote filesystem's
options (an endpoint, a region, anonymous access) come from the source's `storage_options`;
credentials come from the environment as the filesystem's own library reads them (for S3:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile), never from params.yaml.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import IO, Any


class RemoteError(OSError):
    """A remote store that cannot be listed or read (unreachable, no access, no such bucket)."""


def protocol(path: str) -> str:
    """'file' for a local path, else the URL's scheme ('s3', 'gs', 'https', ...)."""
    head, sep, _ = path.partition("://")
    return head.lower() if sep and head.isalnum() else "file"


def is_remote(path: str) -> bool:
    return protocol(path) != "file"


def _fs(proto: str, storage_options: dict[str, Any]):
    import fsspec

    try:
        return fsspec.filesystem(proto, **storage_options)
    except (ImportError, ValueError) as err:  # an unknown protocol or its package missing
        raise RemoteError(f"no filesystem for '{proto}://' ({err})") from None


def list_files(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every file matching the glob patterns, sorted by path, with what identifies its
    version: size and modification time (local), size and ETag or modification time (remote)."""
    so = storage_options or {}
    out: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        proto = protocol(pattern)
        if proto == "file":
            for p in glob.glob(pattern, recursive=True):
                if Path(p).is_file():
                    st = os.stat(p)
                    out[p] = {"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            continue
        fs = _fs(proto, so)
        try:
            fs.invalidate_cache()  # fsspec keeps listings per process: a long-lived worker would see yesterday's files
            found = fs.glob(pattern, detail=True)
        except Exception as err:  # botocore, aiohttp and friends raise many types: name the store and the error
            raise RemoteError(f"cannot list {pattern}: {type(err).__name__}: {str(err)[:300]}") from None
        for p, info in found.items():
            if info.get("type") != "file":
                continue
            url = fs.unstrip_protocol(p)
            version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or info.get("mtime") or "")
            out[url] = {"path": url, "size": int(info.get("size") or 0), "version": str(version).strip('"')}
    return [out[k] for k in sorted(out)]


def file_kind(path: str) -> str:
    """The format suffix of a data file under its compression suffix (`a.jsonl.gz` -> `.jsonl`,
    `b.warc.gz` -> `.warc`)."""
    parts = [s.lower() for s in Path(path.split("?", 1)[0]).suffixes]
    if parts and parts[-1] in (".gz", ".zst") and len(parts) > 1:
        return parts[-2]
    return parts[-1] if parts else ""


def open_raw(path: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """The file's bytes as stored (no decompression)."""
    if not is_remote(path):
        return open(path, "rb")
    fs = _fs(protocol(path), storage_options or {})
    try:
        return fs.open(path, "rb")
    except Exception as err:
        raise RemoteError(f"cannot open {path}: {type(err).__name__}: {str(err)[:300]}") from None


def open_binary(path: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """A binary reader of a data file, decompressing `.gz` (gzip) and `.zst` (Zstandard)."""
    raw = open_raw(path, storage_options)
    suffix = Path(path.split("?", 1)[0]).suffix.lower()
    if suffix == ".gz":
        import gzip

        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        gz.myfileobj = raw  # closed with the reader, as for a file GzipFile opened itself
        return gz  # type: ignore[return-value]
    if suffix == ".zst":
        import io

        import zstandard

        # the decompressing reader has no readline: buffer it so files iterate by lines
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw
