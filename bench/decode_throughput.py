"""Decoding speed: the KV-cache loop before `decode_step`, against `generate` today (the step
appending to the cache) and with its static step under torch.compile (CUDA graphs on a GPU),
in one run on the same model.

    python bench/decode_throughput.py --preset cpu-tiny                    # on a CPU
    python bench/decode_throughput.py --preset gpt2-small --batch 32       # on a GPU

A batch of left-padded prompts of mixed lengths, greedy decoding for --new-tokens tokens
(no stop token, so every variant runs every step). "before" is the loop `generate` ran until
2026-12: the same appending cache, with a causal mask rebuilt over the whole sequence at
every step. Prints generated tokens/s, the ratio against "before", and whether each variant
chose the same tokens as "before" (they should: they attend to the same keys). The compiled
variant's first call (the compile) is timed apart from the measured calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import PRESETS  # noqa: E402
from tasks.lib.model import GPT, KVCache, attention_mask, generate, padded_batch, positions_of  # noqa: E402


@torch.no_grad()
def generate_before(model: GPT, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding as `generate` did it before the static step (the baseline)."""
    dev = next(model.parameters()).device
    tokens, valid = padded_batch(prompts, 0, left=True, device=dev)
    B = tokens.shape[0]
    cache = KVCache(model.cfg, B, tokens.shape[1] + new_tokens, dev, next(model.parameters()).dtype)
    feed, feed_pos, out = tokens, positions_of(valid), []
    for _ in range(new_tokens):
        logits = model.head(model.hidden(feed, positions=feed_pos, mask=attention_mask(valid, feed.shape[1]), cache=cache)[:, -1])
        nxt = logits.argmax(-1)
        out.append(nxt)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        feed, feed_pos = nxt[:, None], positions_of(valid)[:, -1:]
    return torch.stack(out, 1).tolist()


def timed_rounds(variants: dict, repeats: int) -> dict[str, tuple[float, list[list[int]]]]:
    """Median seconds per call of each variant, calls interleaved round by round so that a
    change in the machine's load hits every variant alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    outs = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            outs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=48, help="longest prompt (tokens); the others are shorter")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; the median call of each variant is reported")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PRESETS[args.preset]["cfg"]
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (max(1, args.prompt - 5 * i % args.prompt),), generator=g).tolist() for i in range(args.batch)]
    n = args.new_tokens
    print(f"device: {dev}; torch {torch.__version__}; preset {args.preset}; {args.batch} prompts of up to {args.prompt} tokens, {n} new tokens each")

    new = lambda compile_: generate(model, prompts, n, pad_id=0, temperature=0, compile=compile_)  # noqa: E731
    generate_before(model, prompts, 2)  # warm-up: allocator, kernels
    new(False)
    variants = {"before (growing cache)": lambda: generate_before(model, prompts, n), "decode step (appending)": lambda: new(False)}
    if not args.no_compile:
        t0 = time.perf_counter()
        new(True)
        print(f"compile (first call of the compiled step): {time.perf_counter() - t0:.1f} s")
        variants["static decode step, torch.compile" + (" + CUDA graphs" if dev.type == "cuda" else "")] = lambda: new(True)
    rows = timed_rounds(variants, args.repeats)
    base_s, base_out = rows["before (growing cache)"]
    for name, (s, out) in rows.items():
        same = sum(a == b for a, b in zip(out, base_out))
        print(f"{name:>40}: {args.batch * n / s:10,.0f} tokens/s  x{base_s / s:5.2f} vs before  same tokens as before: {same}/{len(out)} rows")


if __name__ == "__main__":
    main()
