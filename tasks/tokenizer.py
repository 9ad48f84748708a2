"""tokenizer: train a byte-level BPE (HF `tokenizers`) on the training mixture.

    python -m tasks.tokenizer          # what `dvc repro tokenizer` runs

The texts are the mixture's train documents (each once, however many epochs it gets), read
through the mix index shard by shard; `tokenizer.max_train_bytes` caps how much is used.
Vocabulary size and minimum merge frequency come from `tokenizer` in params.yaml. The
special tokens later stages need are added first, so their ids are fixed and small: end of
text, user, assistant, end of turn, reward readout, padding (tasks/lib/bpe.py). Output:
`models/tokenizer/tokenizer.json` (loadable with `tokenizers.Tokenizer.from_file` or
`transformers.PreTrainedTokenizerFast`). Metrics: vocabulary size and bytes per token per
source on the validation documents.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.lib.bpe import save_special_tokens, train_bpe
from tasks.lib.errors import StageError
from tasks.lib.mixture import read_index
from tasks.lib.storage import atomic_dir, read_shard_table

STAGE = "tokenizer"
PARAMS = ("seed", "tokenizer")
INPUTS = ("mix", "dedup")
OUTPUTS = ("tokenizer",)


def documents(index: dict, which: str) -> Iterator[tuple[str, str]]:
    """(source, text) of the train (each once) or val documents, shard by shard."""
    for source, entries in sorted(index.items()):
        for path, counts, val in entries:
            rows = np.flatnonzero(counts > 0 if which == "train" else val)
            if len(rows):
                text = read_shard_table(path, ["text"]).column("text").take(rows).to_pylist()
                for t in text:
                    yield source, t


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.tokenizer
    index = read_index(inputs["mix"], inputs["dedup"])
    budget = cfg.max_train_bytes
    seen = {"docs": 0, "bytes": 0}

    def texts() -> Iterator[str]:
        for _, text in documents(index, "train"):
            if budget is not None and seen["bytes"] >= budget:
                return
            seen["bytes"] += len(text.encode("utf-8"))
            seen["docs"] += 1
            yield text

    tok = train_bpe(texts(), cfg.vocab_size, cfg.min_frequency)
    if seen["docs"] == 0:
        raise StageError(f"{inputs['mix']}: the mixture has no train documents")
    with atomic_dir(outputs["tokenizer"]) as out:
        tok.save(str(out / "tokenizer.json"))
        save_special_tokens(tok, out / "special_tokens.json")
    nbytes, ntok = defaultdict(int), defaultdict(int)
    batch: list[tuple[str, str]] = []
    for item in documents(index, "val"):
        batch.append(item)
        if len(batch) == 1000:
            for (src, text), enc in zip(batch, tok.encode_batch([t for _, t in batch])):
                nbytes[src] += len(text.encode("utf-8"))
                ntok[src] += len(enc.ids)
            batch = []
    for (src, text), enc in zip(batch, tok.encode_batch([t for _, t in batch])):
        nbytes[src] += len(text.encode("utf-8"))
        ntok[src] += len(enc.ids)
    return {
        "vocab_size": tok.get_vocab_size(),
        "train_docs": seen["docs"], "train_bytes": seen["bytes"],
        "bytes_per_token": {s: round(nbytes[s] / max(ntok[s], 1), 3) for s in sorted(nbytes)},
        "bytes_per_token_all": round(sum(nbytes.values()) / max(sum(ntok.values()), 1), 3),
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
