"""chat: talk to a trained model in the terminal, keeping the conversation (a tool, not a stage).

    python -m tasks.chat --model models:/rlhf@champion        # a registered model (empty line quits, /reset starts over)
    python -m tasks.chat --checkpoint models/sft --prompt "What does `len` do?"   # one answer per --prompt, then exit

Each turn sends the whole conversation through the chat template; when it no longer fits the
model's context with `--max-new-tokens` more, the oldest turns are dropped and a line says so
(a message that does not fit on its own is refused, not cut). `models:/rlhf@champion` falls
back to the best version that exists, with a line saying which, when no model has earned the
alias yet. What you type is always text: a literal `<|end_of_turn|><|assistant|>` in it is
encoded as ordinary characters, so nobody can forge a turn (tasks/lib/bpe.py).
"""

from __future__ import annotations

import sys


def load_for_chat(model_uri: str | None, checkpoint: str | None, device: str = "cpu"):
    """(model, tokenizer, is_chat) from a registered model URI or a local checkpoint folder."""
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.model import load_checkpoint

    if model_uri:
        import mlflow

        from tasks.lib import registry
        from tasks.lib.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        concrete, _ = registry.resolve_uri(model_uri)  # @champion falls back, with a line saying so, when none was earned
        folder = registry.download_checkpoint(concrete)
    else:
        from pathlib import Path

        folder = Path(checkpoint)
    model, info = load_checkpoint(folder, device)
    if info["kind"] != "lm":
        raise ValueError(f"{model_uri or checkpoint} is a {info['kind']} model (a reward model), not a language model")
    return model.eval(), load_tokenizer(folder), bool(info.get("chat", False))


class Conversation:
    """The turns so far, as prompt ids that fit the model's context with room for the answer."""

    def __init__(self, template, max_len: int, max_new: int, chat: bool):
        self.t, self.max_len, self.max_new, self.chat = template, max_len, max_new, chat
        self.messages: list[dict] = []

    def ids(self, messages: list[dict]) -> list[int]:
        if self.chat:
            return self.t.chat(messages)
        return [self.t.eot, *self.t.text_ids("\n\n".join(m["content"] for m in messages))]

    def prompt(self, text: str) -> tuple[list[int], int]:
        """The prompt with this user message added, and how many earlier messages were dropped
        to fit; ValueError when the message alone does not fit."""
        msgs = [*self.messages, {"role": "user", "content": text}]
        dropped = 0
        while len(self.ids(msgs)) + self.max_new > self.max_len:
            if len(msgs) == 1:
                raise ValueError(f"that message is too long for the model's context: {len(self.ids(msgs))} tokens + {self.max_new} "
                                 f"to answer > {self.max_len} (shorten it, or lower --max-new-tokens)")
            msgs, dropped = msgs[2:] if len(msgs) > 2 else msgs[1:], dropped + min(2, len(msgs) - 1)
        self.messages = msgs
        return self.ids(msgs), dropped

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.chat", description="Talk to a trained model.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model URI, e.g. models:/rlhf@champion or models:/sft/2")
    src.add_argument("--checkpoint", help="local checkpoint folder, e.g. models/ppo")
    ap.add_argument("--prompt", action="append", help="answer this prompt and exit (repeatable; each on its own)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument("--show-tokens", action="store_true", help="say how many tokens each prompt has (stderr)")
    ap.add_argument("--compile", action="store_true",
                    help="decode under torch.compile (CUDA graphs on a GPU): faster tokens after a first reply that compiles")
    args = ap.parse_args(argv)
    bad = [msg for ok, msg in ((args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be at least 1"),
                               (args.temperature >= 0, f"--temperature {args.temperature}: must be >= 0 (0: greedy)"),
                               (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
                               (0 <= args.seed < 2**63, f"--seed {args.seed}: must be in [0, 2^63)")) if not ok]
    if bad:
        print(f"error: chat: {bad[0]}", file=sys.stderr)
        return 2
    try:
        import torch

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, is_chat = load_for_chat(args.model, args.checkpoint, device)
    except Exception as err:  # a wrong URI or folder: say so plainly
        print(f"error: chat: {err}", file=sys.stderr)
        return 2
    if args.max_new_tokens >= model.cfg.max_seq_len:
        print(f"error: chat: --max-new-tokens {args.max_new_tokens}: must be below the model's context of {model.cfg.max_seq_len}", file=sys.stderr)
        return 2

    import torch

    from tasks.lib.model import generate
    from tasks.lib.template import Template

    t = Template(tok)

    def reply(ids: list[int], seed: int) -> str:
        if args.show_tokens:
            print(f"(prompt of {len(ids)} tokens)", file=sys.stderr)
        out = generate(model, [ids], args.max_new_tokens, pad_id=t.pad, stop_ids=t.stop_ids, temperature=args.temperature,
                       top_p=args.top_p, generator=torch.Generator().manual_seed(seed), compile=args.compile)[0]
        return t.decode(out).strip()

    if args.prompt:
        for i, p in enumerate(args.prompt):
            try:
                ids, _ = Conversation(t, model.cfg.max_seq_len, args.max_new_tokens, is_chat).prompt(p)
            except ValueError as err:
                print(f"error: chat: {err}", file=sys.stderr)
                return 2
            print(reply(ids, args.seed + i))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{'chat' if is_chat else 'completion'} model loaded; /reset starts over, an empty line or Ctrl-D quits")
    conv = Conversation(t, model.cfg.max_seq_len, args.max_new_tokens, is_chat)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            conv.messages = []
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        try:
            ids, dropped = conv.prompt(line.strip())
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"(dropped the oldest {dropped} message(s): the conversation no longer fits the model's context of "
                  f"{model.cfg.max_seq_len} tokens)", file=sys.stderr, flush=True)
        text = reply(ids, args.seed + turn)
        conv.answer(text)
        print(text, flush=True)
        turn += 1


if __name__ == "__main__":
    raise SystemExit(main())
