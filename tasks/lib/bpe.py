"""Byte-level BPE (HF `tokenizers`): training, loading, and the special tokens.

The special tokens are added first, so their ids are fixed and small. They are *control*
tokens: only the chat template (tasks/lib/template.py) and the token writer insert them by
id. `load_tokenizer` switches the tokenizer to encode their strings as ordinary text, so a
document or a user that writes a literal `<|endoftext|>` or `<|user|>` gets plain text
tokens, never a document break or a forged chat turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tasks.lib.errors import StageError

SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_of_turn": "<|end_of_turn|>",
    "reward": "<|reward|>",
    "pad": "<|pad|>",
}


class TokenizerError(StageError):
    """A tokenizer file that is missing or unreadable."""


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
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(folder: str | Path):
    """The tokenizer in `folder/tokenizer.json`, encoding special-token strings as text."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer file (run the tokenizer stage first)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception with a serde message
        raise TokenizerError(f"{path}: not a readable tokenizer ({str(err)[:200]})") from None
    missing = [s for s in SPECIAL_TOKENS.values() if tok.token_to_id(s) is None]
    if missing:
        raise TokenizerError(f"{path}: lacks the special tokens {missing}")
    tok.encode_special_tokens = True
    return tok


def special_ids(tok) -> dict[str, int]:
    return {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}


def save_special_tokens(tok, path: Path) -> None:
    path.write_text(json.dumps({k: {"token": v, "id": tok.token_to_id(v)} for k, v in SPECIAL_TOKENS.items()}, indent=2, sort_keys=True) + "\n")
