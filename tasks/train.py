"""The one training loop shared by pretrain, sft and reward (ppo uses its pieces).

`train_loop` reads top to bottom:
  1. setup: device, DDP when `WORLD_SIZE > 1` (gloo on CPU, nccl on CUDA), bf16 autocast and
     optional `torch.compile` on CUDA, fp32 on CPU;
  2. optimizer: AdamW, weight decay on matrices only;
  3. resume from the last checkpoint when one matches this run's fingerprint;
  4. steps: warmup + cosine learning rate, gradient accumulation, clipping; metrics every
     step to MLflow (loss, lr, grad norm, tokens/s, MFU on GPU) and a progress line with rate
     and ETA; validation every `eval_every`; a checkpoint every `ckpt_every`.

Batches come from `batch_fn(step, micro, rank)`, which must depend only on its arguments:
that is what makes a resumed run see the same data order as an unbroken one. The resume
checkpoint (`model.safetensors`, `optimizer.pt` loaded with `weights_only=True`,
`state.json`) lives in a folder DVC keeps between runs (`persist: true`).

Run a stage under DDP with `torchrun --nproc_per_node N -m tasks.pretrain`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tasks.config import TrainConfig
from tasks.storage import atomic_dir

log = logging.getLogger("train")

# Dense bf16 peak FLOP/s of common accelerators, for MFU (override with train.peak_tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


# ----------------------------------------------------------------------------- setup
class Runtime:
    """Device, precision and distributed context for one process. `cfg` is any params section
    with `device` and `dtype` (a TrainConfig, or the ppo/preferences/evaluate sections)."""

    def __init__(self, cfg: Any):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(f"cuda:{local}" if want == "cuda" else "cpu")
        if want == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want == "cuda" else "gloo")
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and want == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.dtype_name = "bfloat16" if use_bf16 else "float32"
        self.peak = getattr(cfg, "peak_tflops", None)
        if self.peak is None and want == "cuda":
            name = torch.cuda.get_device_name(self.device)
            self.peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, compile_: bool) -> nn.Module:
        model = model.to(self.device)
        if compile_ and self.device.type == "cuda":
            model = torch.compile(model)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def all_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:  # a tied weight appears once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)  # matrices decay; norms, biases don't
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints
def save_resume(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, fingerprint: str) -> None:
    from safetensors.torch import save_model

    with atomic_dir(folder) as tmp:
        save_model(unwrap(model), str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))


def load_resume(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: str) -> int:
    """The step to continue from (0 when there is no matching checkpoint)."""
    from safetensors.torch import load_model

    state_file = folder / "state.json"
    if not state_file.is_file():
        return 0
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint in %s is from other params or inputs: starting afresh", folder)
        return 0
    load_model(unwrap(model), str(folder / "model.safetensors"), device=str(next(model.parameters()).device))
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=next(model.parameters()).device))
    log.info("resuming from step %d (%s)", state["step"], folder)
    return int(state["step"])


# ----------------------------------------------------------------------------- logging
class Reporter:
    """Metrics to MLflow every step (main process only) and a progress line with ETA."""

    def __init__(self, name: str, total: int, main: bool, every_s: float = 10.0, mlflow_on: bool = True):
        self.name, self.total, self.main, self.every_s = name, total, main, every_s
        self.t0 = self.last = time.time()
        self.first_step: int | None = None
        self.mlflow = None
        if main and mlflow_on:
            try:
                import mlflow
            except ImportError:  # a bare GPU box running the benchmark: progress lines only
                mlflow = None
            self.mlflow = mlflow if mlflow is not None and mlflow.active_run() else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}, step=step)
        if self.first_step is None:
            self.first_step, self.t0 = step, time.time()
        now = time.time()
        if now - self.last >= self.every_s or step + 1 == self.total:
            self.last = now
            done = step + 1 - self.first_step
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.total - step - 1) / max(rate, 1e-9)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None)
            log.info("%s step %d/%d | %s | %.2f steps/s | ETA %dm%02ds", self.name, step + 1, self.total, shown, rate, eta // 60, eta % 60)


# ----------------------------------------------------------------------------- the loop
Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def train_loop(
    name: str,
    model: nn.Module,
    cfg: TrainConfig,
    batch_fn: Callable[[int, int, int], Batch],
    loss_fn: LossFn,
    tokens_in: Callable[[Batch], int],
    resume_dir: Path,
    fingerprint: str,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    flops_per_token: float | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for cfg.steps optimizer steps; returns the raw model and a summary."""
    # 1. setup
    rt = Runtime(cfg)
    torch.manual_seed(seed)
    model = rt.wrap(model, cfg.compile)
    model.train()
    # 2. optimizer
    opt = make_optimizer(model, cfg, rt.device)
    # 3. resume
    start = load_resume(resume_dir, model, opt, fingerprint)
    report = Reporter(name, cfg.steps, rt.main)
    history: dict[str, Any] = {"first_loss": None, "evals": []}
    last: dict[str, float] = {}
    # 4. steps
    for step in range(start, cfg.steps):
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, ntok, extra = 0.0, 0, {}
        for micro in range(cfg.grad_accum):
            batch = batch_fn(step, micro, rt.rank)
            sync = micro == cfg.grad_accum - 1 or rt.world == 1
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with ctx:
                with rt.autocast:  # forward in bf16 on CUDA; the backward pass follows outside autocast
                    loss, extra = loss_fn(model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            ntok += tokens_in(batch)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tok_s = ntok * rt.world / dt
        last = {"loss": rt.all_mean(loss_sum), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, **extra}
        if flops_per_token and rt.peak:
            last["mfu"] = tok_s * flops_per_token / (rt.peak * 1e12)
        if history["first_loss"] is None:
            history["first_loss"] = last["loss"]
        report.log(step, last)
        if eval_fn is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            with torch.no_grad(), rt.autocast:
                ev = eval_fn(unwrap(model), step)
            model.train()
            history["evals"].append({"step": step + 1, **ev})
            report.log(step, ev)
            if rt.main:
                log.info("%s eval at step %d: %s", name, step + 1, ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if rt.main and ((step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps):
            save_resume(resume_dir, model, opt, step + 1, fingerprint)
        if on_step is not None:
            on_step(step + 1)
    if rt.main and cfg.steps > start:
        save_resume(resume_dir, model, opt, cfg.steps, fingerprint)
    if eval_fn is not None and not history["evals"]:  # resumed from a finished run: still report
        model.eval()
        with torch.no_grad(), rt.autocast:
            history["evals"].append({"step": cfg.steps, **eval_fn(unwrap(model), cfg.steps - 1)})
    history.update({"final": last, "steps": cfg.steps, "resumed_from": start, "world_size": rt.world, "dtype": rt.dtype_name, "device": str(rt.device)})
    return unwrap(model), history


def seeded(*parts: int) -> torch.Generator:
    """A generator seeded by integers (seed, step, micro-batch, rank, ...): the data a step
    sees depends on nothing else, which is what makes resumed runs repeat unbroken ones."""
    return torch.Generator().manual_seed(hash(parts) & 0x7FFF_FFFF_FFFF)  # int tuples hash stably


def fingerprint_of(*parts: Any) -> str:
    """What a resume checkpoint must match: params, inputs and the training code itself
    (this file, the model and the calling stage), so changed code never reuses old weights."""
    import hashlib
    import inspect

    caller = inspect.stack()[1].filename
    code = [Path(f).read_bytes().hex() for f in (__file__, Path(__file__).with_name("model.py"), caller) if Path(f).is_file()]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for c in code:
        digest.update(c.encode())
    return digest.hexdigest()[:16]
