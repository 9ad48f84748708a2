"""DPO step speed: fp32 against bf16 autocast, on random preference pairs.

    python bench/dpo_throughput.py --preset gpt2-small --steps 6     # on a GPU
    python bench/dpo_throughput.py --preset cpu-tiny --steps 3       # on a CPU

A DPO step as the dpo stage takes it: the frozen reference's log-probabilities of each pair's
chosen and rejected completion (no gradient), the policy's with one, `tasks.lib.rl.dpo_loss`,
the backward pass and an AdamW step. The token ids are random (speed does not depend on what
they say). Prints seconds per step, pairs and completion tokens per second, and the speed-up
against the fp32 run measured in the same process; the first step of each setting is a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import PRESETS  # noqa: E402
from tasks.lib.model import GPT  # noqa: E402
from tasks.lib.rl import dpo_loss, sequence_logprobs  # noqa: E402
from tasks.lib.train import make_optimizer  # noqa: E402


def measure(preset: str, steps: int, pairs: int, prompt_len: int, completion_len: int, bf16: bool) -> dict:
    cfg = PRESETS[preset]["cfg"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    policy = GPT(cfg).to(dev)
    ref = GPT(cfg).to(dev)
    ref.load_state_dict(policy.state_dict())
    ref.eval()
    opt = make_optimizer(policy, SimpleNamespace(lr=1e-6, weight_decay=0.0, beta1=0.9, beta2=0.95), dev)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(prompt_len) for _ in range(pairs)]
    chosen = [draw(completion_len) for _ in range(pairs)]
    rejected = [draw(completion_len) for _ in range(pairs)]
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    stamps: list[float] = []
    for _ in range(steps + 1):  # the first: warm-up
        with autocast:
            with torch.no_grad():
                ref_w = sequence_logprobs(ref, prompts, chosen, 0, dev)
                ref_l = sequence_logprobs(ref, prompts, rejected, 0, dev)
            loss, _ = dpo_loss(sequence_logprobs(policy, prompts, chosen, 0, dev), sequence_logprobs(policy, prompts, rejected, 0, dev),
                               ref_w, ref_l, beta=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    seconds = (stamps[-1] - stamps[0]) / steps
    return {"s_per_step": seconds, "pairs_per_s": pairs / seconds, "tokens_per_s": 2 * pairs * (prompt_len + completion_len) / seconds,
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--completion-tokens", type=int, default=128)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; preset {args.preset}; "
          f"{args.pairs} pairs x ({args.prompt_tokens} prompt + {args.completion_tokens} completion tokens) per step")
    base = None
    for name, bf16 in (("fp32", False), ("bf16", True)):
        r = measure(args.preset, args.steps, args.pairs, args.prompt_tokens, args.completion_tokens, bf16)
        base = base or r["s_per_step"]
        mem = f"{r['max_mem_gb']:.1f} GiB" if r["max_mem_gb"] else "-"
        print(f"{name:>5}: {r['s_per_step']:.3f} s/step  {r['pairs_per_s']:,.1f} pairs/s  {r['tokens_per_s']:,.0f} tokens/s  "
              f"x{base / r['s_per_step']:.2f} vs fp32  peak mem {mem}")


if __name__ == "__main__":
    main()
