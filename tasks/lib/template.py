"""The chat template shared by SFT, preferences, reward, PPO, evaluation and inference.

A conversation is `<|endoftext|>` then, per message, `<|user|>` text `<|end_of_turn|>` or
`<|assistant|>` text `<|end_of_turn|>`. For training, only assistant tokens (their text and
their `<|end_of_turn|>`) carry loss. A prompt for generation ends with `<|assistant|>`; the
model answers until `<|end_of_turn|>`. The reward model reads its score at `<|reward|>`,
appended after the completion. Special tokens enter only here, by id: text is always
encoded as text (see tasks/lib/bpe.py).
"""

from __future__ import annotations

from tasks.lib.bpe import special_ids


class Template:
    def __init__(self, tok):
        self.tok = tok
        ids = special_ids(tok)
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eot, self.user, self.assistant = ids["eot"], ids["user"], ids["assistant"]
        self.end_turn, self.reward, self.pad = ids["end_of_turn"], ids["reward"], ids["pad"]
        self.stop_ids = (self.end_turn, self.eot)

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def render(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it is trained on."""
        ids, mask = [self.eot], [False]
        for m in messages:
            role = m["role"]
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"unknown role {role!r}")
            head = self.assistant if role == "assistant" else self.user
            body = self.text_ids(m["content"]) + [self.end_turn]
            ids += [head] + body
            mask += [False] + [role == "assistant"] * len(body)
        return ids, mask

    def chat(self, messages: list[dict]) -> list[int]:
        """A conversation (system/user/assistant messages) as a prompt for the assistant's next turn."""
        return self.render(messages)[0] + [self.assistant]

    def prompt(self, user_text: str) -> list[int]:
        return [self.eot, self.user, *self.text_ids(user_text), self.end_turn, self.assistant]

    def scored(self, prompt_ids: list[int], completion_ids: list[int], max_len: int | None = None) -> list[int]:
        """What the reward model reads: prompt, completion, then the readout token. When
        that exceeds `max_len`, the prompt's start is cut, never the readout token."""
        seq = [*prompt_ids, *completion_ids, self.reward]
        return seq[-max_len:] if max_len is not None and len(seq) > max_len else seq

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.end_turn, self.eot, self.pad)])


def complete(model, tok, prompts: list[str], chat: bool, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float | None = None, seed: int = 0) -> list[str]:
    """Answers (chat models) or continuations (base models) for plain-text prompts."""
    import torch

    from tasks.lib.model import generate

    t = Template(tok)
    ids = [t.prompt(p) if chat else [t.eot, *t.text_ids(p)] for p in prompts]
    limit = model.cfg.max_seq_len - 1
    ids = [x[-limit:] for x in ids]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, ids, max_new_tokens, pad_id=t.pad, stop_ids=t.stop_ids, temperature=temperature, top_p=top_p, generator=gen)
    return [t.decode(o) for o in out]
