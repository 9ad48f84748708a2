"""The training mixture's index: which documents of the deduplicated shards are used, how
many times in the train split, and which are validation documents.

The mix stage writes `data/mix/<source>.parquet` (columns `shard` = "<source>/part-NNNNN.parquet"
under data/dedup, `row`, `train_count`, `val`); the tokenizer and tokenize stages read the
documents through it, shard by shard, so no text is copied for repeated epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.lib.errors import StageError
from tasks.lib.storage import shard_rows

INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int32()), ("train_count", pa.int32()), ("val", pa.bool_())])


def read_index(mix_dir: Path, dedup_dir: Path) -> dict[str, list[tuple[Path, np.ndarray, np.ndarray]]]:
    """{source: [(dedup shard, train count per row, val per row)]} from the mix index."""
    out: dict[str, list] = {}
    files = sorted(Path(mix_dir).glob("*.parquet"))
    if not files:
        raise StageError(f"{mix_dir}: no mix index (run the mix stage first)")
    for f in files:
        try:
            t = pq.read_table(f, schema=INDEX_SCHEMA)
        except (OSError, pa.ArrowException) as err:
            raise StageError(f"{f}: not a readable mix index ({err})") from None
        shard = t.column("shard").combine_chunks().dictionary_encode()  # 4 bytes per row, not a string
        names = shard.dictionary.to_pylist()
        which = shard.indices.to_numpy(zero_copy_only=False)
        by_shard = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[by_shard], np.arange(len(names) + 1))
        rows, counts, val = (t.column(c).to_numpy(zero_copy_only=False) for c in ("row", "train_count", "val"))
        entries = []
        root = Path(dedup_dir).resolve()
        for k in sorted(range(len(names)), key=names.__getitem__):  # shard names sort in shard order
            name, sel = names[k], by_shard[bounds[k] : bounds[k + 1]]
            path = Path(dedup_dir) / name
            if name is None or root not in path.resolve().parents:  # an index must not lead to the raw crawl or elsewhere
                raise StageError(f"{f}: names a shard {name!r} outside {dedup_dir}: not an index the mix stage wrote (run mix again)")
            if not path.is_file():
                raise StageError(f"{f}: refers to {path}, which does not exist (run dedup and mix again)")
            n = shard_rows(path)
            r = rows[sel]
            if len(r) and (int(r.min()) < 0 or int(r.max()) >= n):
                raise StageError(f"{f}: row {int(r.max()) if int(r.max()) >= n else int(r.min())} of {name}, which has {n} rows "
                                 "(run dedup and mix again)")
            c, v = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
            c[rows[sel]], v[rows[sel]] = counts[sel], val[sel]
            entries.append((path, c, v))
        out[f.stem] = entries
    return out
