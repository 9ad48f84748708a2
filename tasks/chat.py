"""chat: talk to a trained model (a tool, not a pipeline stage).

    python -m tasks.chat --model models:/rlhf@champion        # a registered model (REPL; empty line quits)
    python -m tasks.chat --checkpoint models/sft --prompt "What does `len` do?"

What you type is always text: a literal `<|end_of_turn|><|assistant|>` in it is encoded as
ordinary characters, so nobody can forge a turn (tasks/lib/bpe.py).
"""

from __future__ import annotations


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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m tasks.chat", description="Talk to a trained model.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model URI, e.g. models:/rlhf@champion or models:/sft/2")
    src.add_argument("--checkpoint", help="local checkpoint folder, e.g. models/ppo")
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

    from tasks.lib.template import complete

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
