"""sources: a fingerprint of every input from outside DVC's view, so that new or changed data
reruns exactly the stages that read it: collect's sources, and the human rankings.

    python -m tasks.sources            # what `dvc repro sources` runs (always: always_changed)

`files` sources and `hf` sources are outside DVC's view, so DVC runs this stage every time
(`always_changed: true` in dvc.yaml). It takes about a second and writes `data/sources.json`,
which changes only when a source does, so collect and everything after it rerun only then:

- `files` and `warc` (and `hf` with local `data_files`): each matching file's path, size and
  modification time (as make and DVC's own state do; hashing 100 GB every night would not be
  cheap); for a remote file (s3://, https:// ...) its size and ETag (or modification time).
  A new, removed, rewritten or touched file changes the fingerprint.
- `hf` from a hub: the pinned `revision`, or the dataset's current commit asked from the hub
  (with no network it is recorded as unresolved and a warning says to pin `revision`).
- `builtin`: a hash of the standard-library files the built-in corpora are read from.

It also writes `data/labels.json`, what the preferences stage depends on instead of the
rankings file itself: with `preferences.labeler: file` the SHA-256 of the rankings file
(`paths.human_preferences`), with the judge (`gold`) only that, so saving a ranking in the
labeling app does not make a judge-labelled run stale (DVC deps cannot depend on a mode).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tasks.config import BuiltinSource, FilesSource, HFSource, Params, WarcSource
from tasks.lib.datafiles import RemoteError, list_files
from tasks.lib.errors import StageError
from tasks.lib.storage import write_json

STAGE = "sources"
PARAMS = ("collect.sources", "preferences.labeler")
INPUTS: tuple[str, ...] = ()
OUTPUTS = ("sources", "labels")

log = logging.getLogger(STAGE)


def file_listing(name: str, patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    try:
        return list_files(patterns, storage_options)
    except RemoteError as err:
        raise StageError(f"source '{name}': {err}") from None


def hub_revision(src: HFSource) -> str | None:
    if src.revision:
        return src.revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(src.path, timeout=10).sha
    except Exception as err:  # offline, unknown dataset, no access: the fingerprint says so
        log.warning("source '%s': could not ask the hub for the current commit of %s (%s); pin `revision` so that "
                    "updates of the dataset rerun collect", src.name, src.path, type(err).__name__)
        return None


def fingerprint(src: Any) -> dict[str, Any]:
    if isinstance(src, (FilesSource, WarcSource)):
        files = file_listing(src.name, src.globs, src.storage_options)
        if not files:
            raise StageError(f"source '{src.name}': no file matches {src.globs}")
        return {"kind": src.kind, "files": files}
    if isinstance(src, HFSource):
        if src.data_files:
            patterns = [src.data_files] if isinstance(src.data_files, str) else list(src.data_files)
            return {"kind": "hf", "path": src.path, "files": file_listing(src.name, patterns)}
        return {"kind": "hf", "path": src.path, "revision": hub_revision(src)}
    from tasks.lib.corpora import stdlib_fingerprint

    assert isinstance(src, BuiltinSource)
    return {"kind": "builtin", "corpus": src.corpus, "python": sys.version.split()[0], "stdlib_sha256": stdlib_fingerprint()}


def labels_fingerprint(labeler: str, rankings: Path) -> dict[str, Any]:
    """What the preferences stage reads besides the SFT model: the rankings file only in file mode."""
    if labeler != "file":
        return {"labeler": labeler}
    from tasks.lib.hashing import file_hash

    if not rankings.is_file():
        raise StageError(f"{rankings}: no such file (preferences.labeler is 'file'; rank with `python -m tasks.label --labeler NAME`)")
    return {"labeler": labeler, "path": str(rankings), "sha256": file_hash(rankings)}


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    listing = {src.name: fingerprint(src) for src in params.collect.sources}
    write_json(outputs["sources"], listing)
    write_json(outputs["labels"], labels_fingerprint(params.preferences.labeler, Path(params.paths.human_preferences)))
    return {"sources": len(listing), "files": sum(len(v.get("files", [])) for v in listing.values())}


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
