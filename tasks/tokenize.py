"""tokenize: encode the mixture into flat binary token files for pretraining.

    python -m tasks.tokenize           # what `dvc repro tokenize` runs

Writes `data/tokens/train.bin` and `val.bin`: the documents' token ids back to back, each
followed by the end-of-text token, as uint16 when the vocabulary fits (else uint32), and
`meta.json` (dtype, vocab size, special token ids, tokens per split and per source). Read
them with `np.memmap(path, dtype=meta["dtype"], mode="r")`. Encoding is batched
(`encode_batch` runs on all cores).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from tasks.config import SPECIAL_TOKENS, Params
from tasks.storage import atomic_dir, progress, read_docs, write_json
from tasks.tokenizer import load_tokenizer

STAGE = "tokenize"
PARAMS = ("tokenize",)
INPUTS = ("mix", "tokenizer")
OUTPUTS = ("tokens",)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    tok = load_tokenizer(inputs["tokenizer"])
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    eot = tok.token_to_id(SPECIAL_TOKENS["eot"])
    bs = params.tokenize.batch_docs
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab,
        "special_tokens": {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()},
        "splits": {},
    }
    with atomic_dir(outputs["tokens"]) as out:
        for split in ("train", "val"):
            rows = read_docs(inputs["mix"] / split)
            per_source: dict[str, int] = defaultdict(int)
            n = 0
            with open(out / f"{split}.bin", "wb") as fh, progress(total=len(rows), desc=f"tokenize {split}") as bar:
                for start in range(0, len(rows), bs):
                    batch = rows[start : start + bs]
                    encs = tok.encode_batch([r["text"] for r in batch])
                    for row, enc in zip(batch, encs):
                        ids = np.asarray(enc.ids + [eot], dtype=dtype)
                        ids.tofile(fh)
                        per_source[row["source"]] += len(ids)
                        n += len(ids)
                    bar.update(len(batch))
            meta["splits"][split] = {"tokens": n, "docs": len(rows), "tokens_per_source": dict(sorted(per_source.items()))}
        write_json(out / "meta.json", meta)
    return {"dtype": dtype.name, "vocab_size": vocab, **{f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()}, "splits": meta["splits"]}


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
