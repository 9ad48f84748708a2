"""Training throughput of the shared loop: fp32 vs bf16 autocast vs bf16 + torch.compile.

    python bench/train_throughput.py --preset gpt2-small --steps 30     # on a GPU
    python bench/train_throughput.py --preset cpu-tiny --steps 10       # on a CPU

Runs `tasks.train.train_loop` on random tokens for each precision setting and prints
tokens/s, MFU (on a GPU whose peak is known) and the speed-up against the fp32 run measured
in the same process. It also checks that scaled-dot-product attention runs on the flash
kernel (CUDA) and that KV-cache generation matches plain greedy decoding in bf16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import Compute, TrainConfig, load_params  # noqa: E402
from tasks.lib.model import GPT, ModelConfig, generate  # noqa: E402
from tasks.lib.runtime import Runtime  # noqa: E402
from tasks.lib.train import train_loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    "gpt2-small": dict(cfg=ModelConfig(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024), batch=16),
    "cpu-tiny": dict(cfg=ModelConfig(vocab_size=8192, n_layer=4, n_head=4, d_model=192, max_seq_len=256), batch=16),
}


def measure(cfg: ModelConfig, batch: int, steps: int, warmup: int, dtype: str, compile_: bool) -> dict:
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = GPT(cfg)
    T = cfg.max_seq_len
    stamps: list[float] = []

    def batch_fn(step, micro):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    def loss_fn(m, b):
        dev = next(m.parameters()).device
        return m(b[0].to(dev, non_blocking=True), b[1].to(dev, non_blocking=True))[1], {}

    def on_step(step):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    defaults = load_params(str(ROOT / "params.yaml")).pretrain
    tc = TrainConfig.model_validate({**defaults.train.model_dump(), "steps": warmup + steps, "batch_size": batch, "lr": 3e-4,
                                     "warmup_steps": 0, "eval_every": 10**9, "ckpt_every": 10**9})
    rt = Runtime(Compute.model_validate({**defaults.compute.model_dump(), "dtype": dtype, "compile": compile_}))
    with tempfile.TemporaryDirectory() as tmp:
        _, hist = train_loop("bench", model, tc, rt, batch_fn, loss_fn, lambda b: b[0].numel(), Path(tmp) / "ckpt", "bench", on_step=on_step)
    elapsed = stamps[-1] - stamps[warmup - 1]
    tok_s = steps * batch * T / elapsed
    peak = rt.peak
    fpt = model.flops_per_token(T)
    return {"tokens_per_s": tok_s, "mfu": tok_s * fpt / (peak * 1e12) if peak else None, "loss": hist["final"]["loss"],
            "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def checks(cfg: ModelConfig) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT(ModelConfig(**{**cfg.__dict__, "n_layer": 2})).to(dev)
    if dev == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x = torch.randint(0, cfg.vocab_size, (2, 256), device=dev)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, x)  # raises if the flash kernel cannot run this attention
        print("flash attention (SDPBackend.FLASH_ATTENTION, bf16): ok")
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    ctx = torch.autocast(dev, dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        a = generate(model, prompts, 32, pad_id=0, temperature=0, use_cache=True)
        b = generate(model, prompts, 32, pad_id=0, temperature=0, use_cache=False)
    same = sum(x == y for x, y in zip(a, b))
    print(f"greedy decoding with vs without KV cache ({'bf16' if dev == 'cuda' else 'fp32'}): {same}/{len(a)} identical")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    batch = args.batch or p["batch"]
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; preset {args.preset} "
          f"({GPT(p['cfg']).num_params() / 1e6:.1f}M params), batch {batch} x {p['cfg'].max_seq_len}")
    settings = [("fp32", "float32", False), ("bf16", "bfloat16", False)] + ([("bf16+compile", "bfloat16", True)] if cuda else [])
    base = None
    for name, dtype, comp in settings:
        r = measure(p["cfg"], batch, args.steps, args.warmup, dtype, comp)
        base = base or r["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        mem = f"{r['max_mem_gb']:.1f} GiB" if r["max_mem_gb"] else "-"
        print(f"{name:>13}: {r['tokens_per_s']:>10,.0f} tokens/s  x{r['tokens_per_s'] / base:.2f} vs fp32  MFU {mfu}  peak mem {mem}  loss {r['loss']:.3f}")
    checks(p["cfg"])


if __name__ == "__main__":
    main()
