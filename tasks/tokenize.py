"""tokenize: encode the mixture into flat binary token files for pretraining.

    python -m tasks.tokenize           # what `dvc repro tokenize` runs

Writes `data/tokens/train.bin` and `val.bin`: the documents' token ids back to back, each
followed by the end-of-text token, as uint16 when the vocabulary fits (else uint32), and
`meta.json` (dtype, vocab size, special token ids, tokens per split and per source). Read
them with `np.memmap(path, dtype=meta["dtype"], mode="r")` (tasks/lib/tokens.py).

The mix index says which documents of which deduplicated shard are used and how many times
(epochs); each shard is encoded by one worker in parallel (tasks/lib/executor.py) into its
own part files, which are then joined in shard order, so the result is the same on any
executor. A document repeated for k epochs is written k times. Special-token strings inside
documents are encoded as plain text; only the end-of-text separator is a control token.
"""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.lib.bpe import load_tokenizer, special_ids
from tasks.lib.mixture import read_index
from tasks.lib.storage import atomic_dir, read_shard_table, write_json
from tasks.lib.tokens import token_dtype

STAGE = "tokenize"
PARAMS = ("tokenize",)
UNTRACKED = ("executor",)
INPUTS = ("mix", "dedup", "tokenizer")
OUTPUTS = ("tokens",)


@dataclass(frozen=True)
class EncodeTask:
    index: int
    path: str
    counts: bytes  # int32 train count per row
    val: bytes  # packed booleans
    rows: int
    tokenizer: str
    work: str
    batch_docs: int


_LOADED: dict[tuple, object] = {}


def worker_tokenizer(folder: str):
    """The tokenizer, loaded once per worker process: every `tokenizers` instance keeps a few
    MB that are not given back when it is dropped (measured: ~8 MB per instance, so a worker
    that loaded it per shard grew by GBs on a 5 GB corpus). Keyed by the file's identity, so
    a rewritten tokenizer is loaded again; only the latest is kept."""
    st = (Path(folder) / "tokenizer.json").stat() if (Path(folder) / "tokenizer.json").is_file() else None
    key = (str(folder), st and (st.st_ino, st.st_mtime_ns, st.st_size))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_tokenizer(folder)
    return _LOADED[key]


def encode_shard(task: EncodeTask) -> dict[str, int]:
    """Encode the used rows of one shard into train/val part files; token counts per split."""
    tok = worker_tokenizer(task.tokenizer)
    eot = special_ids(tok)["eot"]
    dtype = token_dtype(tok.get_vocab_size())
    counts = np.frombuffer(task.counts, dtype=np.int32)
    val = np.unpackbits(np.frombuffer(task.val, dtype=np.uint8))[: task.rows].astype(bool)
    used = np.flatnonzero((counts > 0) | val)
    text = read_shard_table(Path(task.path), ["text"]).column("text").take(used).to_pylist() if len(used) else []
    n = {"train": 0, "val": 0}
    work = Path(task.work)
    with open(work / f"train-{task.index:06d}.bin", "wb") as ft, open(work / f"val-{task.index:06d}.bin", "wb") as fv:
        for start in range(0, len(used), task.batch_docs):
            rows = used[start : start + task.batch_docs]
            for row, enc in zip(rows, tok.encode_batch(text[start : start + task.batch_docs])):
                ids = np.asarray(enc.ids + [eot], dtype=dtype)
                for _ in range(int(counts[row])):
                    ids.tofile(ft)
                    n["train"] += len(ids)
                if val[row]:
                    ids.tofile(fv)
                    n["val"] += len(ids)
    return n


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.executor import Executor

    ex = params.executor
    tok = load_tokenizer(inputs["tokenizer"])
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    index = read_index(inputs["mix"], inputs["dedup"])
    entries = [(source, path, c, v) for source, parts in sorted(index.items()) for path, c, v in parts]
    meta = {"dtype": dtype.name, "vocab_size": vocab, "special_tokens": special_ids(tok), "splits": {}}
    with atomic_dir(outputs["tokens"]) as out, Executor(ex.kind, ex.workers, ex.ray_address, desc="tokenize") as pool:
        work = out / ".work"
        work.mkdir()
        tasks = [EncodeTask(i, str(path), c.astype(np.int32).tobytes(), np.packbits(v).tobytes(), len(c),
                            str(inputs["tokenizer"]), str(work), params.tokenize.batch_docs) for i, (_, path, c, v) in enumerate(entries)]
        results = pool.map(encode_shard, tasks)
        for split in ("train", "val"):
            per_source: dict[str, int] = defaultdict(int)
            docs = 0
            with open(out / f"{split}.bin", "wb") as dest:
                for i, ((source, _, c, v), r) in enumerate(zip(entries, results)):
                    part = work / f"{split}-{i:06d}.bin"
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dest, 1 << 22)
                    part.unlink()
                    per_source[source] += r[split]
                    docs += int(c.sum()) if split == "train" else int(v.sum())
            meta["splits"][split] = {"tokens": sum(per_source.values()), "docs": docs, "tokens_per_source": dict(sorted(per_source.items()))}
        shutil.rmtree(work)
        write_json(out / "meta.json", meta)
    return {"dtype": dtype.name, "vocab_size": vocab, **{f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()}, "splits": meta["splits"]}


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
