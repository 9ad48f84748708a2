"""tokenizer: train a byte-level BPE (HF `tokenizers`) on the training mixture.

    python -m tasks.tokenizer          # what `dvc repro tokenizer` runs

Vocabulary size and minimum merge frequency come from `tokenizer` in params.yaml. The
special tokens later stages need are added first, so their ids are fixed and small:
end of text, user, assistant, end of turn, reward readout, padding (see
tasks.config.SPECIAL_TOKENS). Output: `models/tokenizer/tokenizer.json` (loadable with
`tokenizers.Tokenizer.from_file` or `transformers.PreTrainedTokenizerFast`). Metrics: vocab
size and bytes per token per source on the validation split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from tasks.config import SPECIAL_TOKENS, Params
from tasks.storage import StageError, atomic_dir, read_docs, write_json

STAGE = "tokenizer"
PARAMS = ("seed", "tokenizer")
INPUTS = ("mix",)
OUTPUTS = ("tokenizer",)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise StageError(f"{path}: no tokenizer (run the tokenizer stage first)")
    return Tokenizer.from_file(str(path))


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.tokenizer
    train = read_docs(inputs["mix"] / "train")
    if not train:
        raise StageError(f"{inputs['mix']}/train has no documents")
    budget = cfg.max_train_bytes

    def texts() -> Iterator[str]:
        used = 0
        for row in train:
            if budget is not None and used >= budget:
                return
            used += len(row["text"].encode("utf-8"))
            yield row["text"]

    tok = train_bpe(texts(), cfg.vocab_size, cfg.min_frequency)
    with atomic_dir(outputs["tokenizer"]) as out:
        tok.save(str(out / "tokenizer.json"))
        write_json(out / "special_tokens.json", {k: {"token": v, "id": tok.token_to_id(v)} for k, v in SPECIAL_TOKENS.items()})

    val = read_docs(inputs["mix"] / "val") or train[:200]
    nbytes, ntok = defaultdict(int), defaultdict(int)
    for row, enc in zip(val, tok.encode_batch([r["text"] for r in val])):
        nbytes[row["source"]] += len(row["text"].encode("utf-8"))
        ntok[row["source"]] += len(enc.ids)
    return {
        "vocab_size": tok.get_vocab_size(),
        "bytes_per_token": {s: round(nbytes[s] / max(ntok[s], 1), 3) for s in sorted(nbytes)},
        "bytes_per_token_all": round(sum(nbytes.values()) / max(sum(ntok.values()), 1), 3),
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
