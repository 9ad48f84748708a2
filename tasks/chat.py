"""The chat template shared by SFT, preferences, reward, PPO and inference, and `chat`.

    python -m tasks.chat --model models:/rlhf@champion        # talk to a registered model
    python -m tasks.chat --checkpoint models/sft --prompt "What does `len` do?"

A conversation is `<|endoftext|>` then, per message, `<|user|>` text `<|end_of_turn|>` or
`<|assistant|>` text `<|end_of_turn|>`. For training, only assistant tokens (their text and
their `<|end_of_turn|>`) carry loss. A prompt for generation ends with `<|assistant|>`; the
model answers until `<|end_of_turn|>`. The reward model reads its score at `<|reward|>`,
appended after the completion.
"""

from __future__ import annotations

from tasks.config import SPECIAL_TOKENS


class Template:
    def __init__(self, tok):
        self.tok = tok
        ids = {k: tok.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}
        missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eot, self.user, self.assistant = ids["eot"], ids["user"], ids["assistant"]
        self.end_turn, self.reward, self.pad = ids["end_of_turn"], ids["reward"], ids["pad"]

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

    def prompt(self, user_text: str) -> list[int]:
        return [self.eot, self.user, *self.text_ids(user_text), self.end_turn, self.assistant]

    def scored(self, prompt_ids: list[int], completion_ids: list[int]) -> list[int]:
        """What the reward model reads: prompt, completion, then the readout token."""
        return [*prompt_ids, *completion_ids, self.reward]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.end_turn, self.eot, self.pad)])


def complete(model, tok, prompts: list[str], chat: bool, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float | None = None, seed: int = 0) -> list[str]:
    """Answers (chat models) or continuations (base models) for plain-text prompts."""
    import torch

    from tasks.model import generate

    t = Template(tok)
    ids = [t.prompt(p) if chat else [t.eot, *t.text_ids(p)] for p in prompts]
    limit = model.cfg.max_seq_len - 1
    ids = [x[-limit:] for x in ids]
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, ids, max_new_tokens, pad_id=t.pad, stop_ids=(t.end_turn, t.eot), temperature=temperature, top_p=top_p, generator=gen)
    return [t.decode(o) for o in out]


def load_for_chat(model_uri: str | None, checkpoint: str | None, device: str = "cpu"):
    """(model, tokenizer, is_chat) from a registered model URI or a local checkpoint folder."""
    from tokenizers import Tokenizer

    from tasks.model import load_checkpoint

    if model_uri:
        import mlflow

        from tasks import registry
        from tasks.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        folder = registry.download_checkpoint(model_uri)
    else:
        from pathlib import Path

        folder = Path(checkpoint)
    model, info = load_checkpoint(folder, device)
    if info["kind"] != "lm":
        raise ValueError(f"{model_uri or checkpoint} is a {info['kind']} model (a reward model), not a language model")
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json")), bool(info.get("chat", False))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m tasks.chat", description="Talk to a trained model.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model URI, e.g. models:/rlhf@champion or models:/sft/2")
    src.add_argument("--checkpoint", help="local checkpoint folder, e.g. models/rlhf")
    ap.add_argument("--prompt", action="append", help="answer this prompt and exit (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    args = ap.parse_args(argv)
    try:
        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, is_chat = load_for_chat(args.model, args.checkpoint, device)
    except Exception as err:  # a wrong URI or folder: say so plainly
        print(f"error: {err}", file=sys.stderr)
        return 2

    def answer(text: str, seed: int) -> str:
        return complete(model, tok, [text], chat=is_chat, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=seed)[0]

    if args.prompt:
        for i, p in enumerate(args.prompt):
            print(answer(p, args.seed + i))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{'chat' if is_chat else 'completion'} model loaded; empty line or Ctrl-D to quit")
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        print(answer(line.strip(), args.seed + turn), flush=True)
        turn += 1


if __name__ == "__main__":
    raise SystemExit(main())
