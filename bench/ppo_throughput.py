"""PPO iteration speed: fp32 against bf16 autocast, on a planted reward.

    python bench/ppo_throughput.py --preset gpt2-small --iters 4     # on a GPU
    python bench/ppo_throughput.py --preset cpu-tiny --iters 2       # on a CPU

Runs `tasks.lib.rl_loop.rl_loop` (algorithm ppo) (rollout with the KV cache, scoring, KL, GAE, clipped updates)
with a policy, a frozen reference and a value model of the preset's size. The reward is
planted (the share of one token in the response), so no reward model is needed. Prints the
seconds per iteration, generated tokens per second and the speed-up against the fp32 run
measured in the same process; the first iteration of each setting is a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_throughput import PRESETS  # noqa: E402
from tasks.config import PPO, load_params  # noqa: E402
from tasks.lib.model import GPT, ScalarModel  # noqa: E402
from tasks.lib.rl_loop import rl_loop  # noqa: E402


def measure(preset: str, iters: int, prompts_per_iter: int, new_tokens: int, bf16: bool) -> dict:
    cfg = PRESETS[preset]["cfg"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    policy = GPT(cfg).to(dev)
    ref = GPT(cfg).to(dev)
    ref.load_state_dict(policy.state_dict())
    value = ScalarModel(cfg).to(dev)
    prompts = [[1 + (i % 50), 2, 3 + (i % 7)] for i in range(4 * prompts_per_iter)]
    lengths: list[float] = []
    stamps: list[float] = []

    def score_fn(ps, responses, idx):
        return torch.tensor([sum(t == 7 for t in r) / max(len(r), 1) for r in responses], dtype=torch.float)

    def on_iter(it, row, responses, idx):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        lengths.append(sum(len(r) for r in responses))

    defaults = load_params(str(Path(__file__).resolve().parents[1] / "params.yaml")).ppo.model_dump()
    ppo = PPO.model_validate({**defaults, "steps": iters + 1, "batch_prompts": prompts_per_iter, "lr": 1e-5, "value_lr": 1e-5,
                              "sampling": {**defaults["sampling"], "max_new_tokens": new_tokens},
                              "kl": {**defaults["kl"], "beta": 0.05, "adaptive": False}})
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rl_loop(policy, ref, value, score_fn, prompts, ppo, pad_id=0, stop_ids=(), seed=0, device=dev, on_iter=on_iter, autocast=autocast)
    seconds = (stamps[-1] - stamps[0]) / iters  # from the end of the warm-up iteration
    return {"s_per_iter": seconds, "gen_tokens_per_s": sum(lengths[1:]) / (stamps[-1] - stamps[0]),
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per PPO iteration")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; preset {args.preset}; "
          f"{args.prompts} prompts x {args.new_tokens} new tokens per iteration")
    base = None
    for name, bf16 in (("fp32", False), ("bf16", True)):
        r = measure(args.preset, args.iters, args.prompts, args.new_tokens, bf16)
        base = base or r["s_per_iter"]
        mem = f"{r['max_mem_gb']:.1f} GiB" if r["max_mem_gb"] else "-"
        print(f"{name:>5}: {r['s_per_iter']:.2f} s/iteration  {r['gen_tokens_per_s']:,.0f} generated tokens/s  "
              f"x{base / r['s_per_iter']:.2f} vs fp32  peak mem {mem}")


if __name__ == "__main__":
    main()
