"""The one training loop shared by pretrain, sft and reward (ppo uses its optimizer and state).

`train_loop` reads top to bottom:
  1. setup: the model on the runtime's device (DDP under torchrun, optional torch.compile);
  2. optimizer: AdamW, weight decay on matrices only;
  3. resume from the last checkpoint when it matches this run's fingerprint (params, code
     and the content of the inputs); an unreadable checkpoint is reported and set aside;
  4. steps: warmup + cosine learning rate, gradient accumulation, clipping, a divergence guard;
     metrics every step to MLflow (read back from the device one step late, so the host never
     waits for the GPU inside a step) and a progress line with rate and ETA; validation every
     `eval_every` (keeping the best weights when `best_by` names a held-out metric); a
     checkpoint every `ckpt_every`.

The checkpoint state keeps the run's whole history (per-step curve, evaluations), so a
resumed run reports the same figures as an unbroken one, and a finished run found again
(`dvc repro -f`) is reused as a whole: same weights, same report, nothing retrained.
Volatile figures (tokens/s, MFU) go to MLflow only.

Batches come from `batch_fn(step, micro)`, which must depend only on its arguments: that is
what makes a resumed run see the same data order as an unbroken one. Under DDP (W processes
under torchrun) the step's `grad_accum` micro-batches are split over the processes: process r
draws micro-batches r*A/W ... (r+1)*A/W - 1, so the global batch, the data and (within
floating-point rounding) the weights are those of one process, on any number of processes.
A checkpoint holds whole weights and optimizer state, so a run resumes on another number.

A stage runs under DDP when its `compute.nproc_per_node` / `nnodes` say so (tasks/stage.py
relaunches it under torchrun).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tasks.lib.errors import StageError
from tasks.lib.runtime import Runtime, local, unwrap
from tasks.lib.storage import atomic_dir

log = logging.getLogger("train")


class DivergenceError(StageError):
    """A non-finite loss or weight: the run stops before anything is written or registered."""


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; `cfg` has lr, weight_decay, beta1, beta2."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # a tied weight appears once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)  # matrices decay; norms, biases don't
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, cfg: Any) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def check_finite(model: nn.Module, what: str) -> None:
    bad = [n for n, p in unwrap(model).named_parameters() if not torch.isfinite(local(p)).all()]  # (FSDP: gathered)
    if bad:
        raise DivergenceError(f"{what}: non-finite weights in {bad[:3]}{'…' if len(bad) > 3 else ''}: the run diverged "
                              "(lower the learning rate or raise warmup); nothing was written")


# ----------------------------------------------------------------------------- checkpoints
def fingerprint(parts: Any, code: str, input_hash: str) -> str:
    """What a resume checkpoint must match: params, the stage's code (its import closure)
    and the content of its inputs."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(code.encode())
    h.update(input_hash.encode())
    return h.hexdigest()[:20]


def save_state(folder: Path, tensors: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], state: dict,
               extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Weights (safetensors), optimizer states (tensors only, loaded with weights_only=True),
    extra state dicts (e.g. the best weights so far) and a JSON state, replaced whole: a kill
    during the write leaves the previous checkpoint."""
    from safetensors.torch import save_file, save_model

    with atomic_dir(folder) as tmp:
        for name, module in tensors.items():
            save_model(unwrap(module), str(tmp / f"{name}.safetensors"))
        for name, sd in (extra or {}).items():
            save_file(sd, str(tmp / f"{name}.safetensors"))
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True, allow_nan=False))


def load_state(folder: Path, tensors: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], fingerprint_: str,
               clean: bool = True) -> dict | None:
    """The saved state when `folder` holds a checkpoint of this very run, else None. A torn
    or corrupt checkpoint is deleted with a warning and the run starts afresh (`clean=False`:
    a reader that leaves that and the cleaning of a killed write to another process)."""
    from safetensors.torch import load_model

    from tasks.lib.storage import clean_stale

    if clean:
        clean_stale(folder)  # a kill inside the last replacement left the previous checkpoint aside: put it back first
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != fingerprint_:
            log.info("checkpoint in %s is from other params, code or inputs: starting afresh", folder)
            return None
        for name, module in tensors.items():
            load_model(unwrap(module), str(folder / f"{name}.safetensors"), device=str(next(module.parameters()).device))
        device = next(iter(tensors.values())).parameters().__next__().device
        opts = torch.load(folder / "optimizer.pt", weights_only=True, map_location=device)
        for k, o in optimizers.items():
            o.load_state_dict(opts[k])
    except Exception as err:  # noqa: BLE001 - any unreadable part means the checkpoint is unusable
        log.warning("checkpoint in %s is unreadable (%s: %s): deleted, starting from scratch",
                    folder, type(err).__name__, str(err)[:200])
        if clean:
            shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("checkpoint in %s is this run at step %d: %s", folder, state["step"], "reusing it" if state.get("finished") else "resuming")
    return state


def load_state_everywhere(rt: Runtime | None, folder: Path, tensors: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                          fingerprint_: str, name: str) -> dict:
    """load_state on every process of a replicated run (`rt` None: one process): the first
    reads (and cleans or sets aside) the checkpoint, then the others; all must find the same."""
    main = rt is None or rt.main
    state = (load_state(folder, tensors, optimizers, fingerprint_) if main else None) or {}
    if rt is not None and rt.world > 1:
        rt.barrier()
        if not rt.main:
            state = load_state(folder, tensors, optimizers, fingerprint_, clean=False) or {}
        start = int(state.get("step", 0))
        if not rt.same_everywhere(start):
            raise StageError(f"{name}: the processes found different checkpoints in {folder} (step {start} on rank {rt.rank}): every "
                             "node must see the first node's checkpoints folder (a shared filesystem), or delete it to start afresh")
    return state


# ----------------------------------------------------------------------------- logging
class Reporter:
    """Metrics to MLflow every step (main process only) and a progress line with ETA."""

    def __init__(self, name: str, total: int, main: bool, every_s: float = 10.0):
        self.name, self.total, self.main, self.every_s = name, total, main, every_s
        self.t0 = self.last = time.time()
        self.first_step: int | None = None
        self.mlflow = None
        if main:
            try:
                import mlflow
            except ImportError:  # a bare GPU box running a benchmark: progress lines only
                mlflow = None
            self.mlflow = mlflow if mlflow is not None and mlflow.active_run() else None

    def to_mlflow(self, step: int, metrics: dict[str, Any]) -> None:
        if self.main and self.mlflow is not None:
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
            if finite:
                self.mlflow.log_metrics(finite, step=step)

    def replay(self, rows: list[dict], key: str = "step") -> None:
        """Log the history of a resumed run again, so this run's curves are whole."""
        if not (self.main and self.mlflow is not None and rows):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(r[key])) for r in rows for k, v in r.items()
                 if k != key and isinstance(v, (int, float)) and math.isfinite(float(v))]
        client, run_id = self.mlflow.MlflowClient(), self.mlflow.active_run().info.run_id
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """`step` counts from 0; MLflow gets step + 1 (steps done), as the saved history does."""
        if not self.main:
            return
        self.to_mlflow(step + 1, metrics)
        if self.first_step is None:
            self.first_step, self.t0 = step, time.time()
        now = time.time()
        if now - self.last >= self.every_s or step + 1 == self.total:
            self.last = now
            # the clock started when the first logged step ended: the steps timed are those after it
            done = step - self.first_step
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            if done and now > self.t0:
                rate = done / (now - self.t0)
                eta = round((self.total - step - 1) / rate)
                speed = f"{rate:.2f} steps/s | ETA {eta // 60}m{eta % 60:02d}s"
            else:
                speed = "timing from the next step"
            log.info("%s step %d/%d | %s | %s", self.name, step + 1, self.total, shown, speed)


# ----------------------------------------------------------------------------- the loop
Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def train_loop(
    name: str,
    model: nn.Module,
    cfg: Any,
    rt: Runtime,
    batch_fn: Callable[[int, int, int], Batch],
    loss_fn: LossFn,
    tokens_in: Callable[[Batch], int],
    resume_dir: Path,
    fingerprint_: str,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
    flops_per_token: float | None = None,
    seed: int = 0,
    best_by: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for cfg.steps optimizer steps (cfg: a TrainConfig); returns the raw
    model and its history: `curve` (per step), `evals`, `first_loss`, `final`,
    `resumed_from`, and `best` when `best_by` names an eval metric to maximise (the returned
    weights are then those of the best evaluation)."""
    # 1. setup
    if cfg.grad_accum % rt.world:
        raise StageError(f"{name}: grad_accum {cfg.grad_accum} does not divide over {rt.world} processes "
                         "(the global batch would change): make it a multiple of the number of processes")
    local_accum = cfg.grad_accum // rt.world  # this process's share of the step's micro-batches
    torch.manual_seed(seed)
    model = rt.wrap(model)
    model.train()
    # 2. optimizer
    opt = make_optimizer(model, cfg, rt.device)
    # 3. resume: the first process reads (and cleans or sets aside) the checkpoint, then the others
    if not rt.sharded:
        state = load_state_everywhere(rt, resume_dir, {"model": model}, {"model": opt}, fingerprint_, name)
    else:  # the first process reads whole weights into a plain copy and spreads them over the shards
        state = {}
        if rt.main:
            from tasks.lib.storage import clean_stale

            clean_stale(resume_dir)  # a kill inside the last replacement left the previous checkpoint aside: put it back first
        if rt.broadcast((resume_dir / "state.json").is_file()):  # gathering a plain copy is only worth it then
            holder = rt.plain(model, device="cpu")
            holder_opt = make_optimizer(holder, cfg, torch.device("cpu")) if rt.main else None
            state = (load_state(resume_dir, {"model": holder}, {"model": holder_opt}, fingerprint_) if rt.main else None) or {}
            state = rt.broadcast(state)
            if state:
                rt.load_sharded(model, opt, holder.state_dict() if rt.main else None, holder_opt.state_dict() if rt.main else None)
            del holder, holder_opt
    start = int(state.get("step", 0))
    curve: list[dict] = state.get("curve", [])
    evals: list[dict] = state.get("evals", [])
    best: dict | None = state.get("best")
    best_weights: dict[str, torch.Tensor] | None = None
    if best is not None and start > 0:
        from safetensors.torch import load_file

        best_weights = load_file(str(resume_dir / "best.safetensors"))
    report = Reporter(name, cfg.steps, rt.main)
    report.replay(curve)
    report.replay(evals)

    def evaluate(step: int) -> None:
        nonlocal best, best_weights
        model.eval()
        with torch.no_grad(), rt.autocast:  # (under FSDP every process evaluates: each forward gathers weights from all)
            ev = eval_fn(unwrap(model), step)
        model.train()
        ev = rt.broadcast(ev)  # the first process's figures: every process then keeps the same best step
        evals.append({"step": step + 1, **ev})
        report.to_mlflow(step + 1, ev)
        if rt.main:
            log.info("%s eval at step %d: %s", name, step + 1, ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if best_by is not None and (best is None or ev[best_by] > best["value"]):  # strictly better: ties keep the earlier
            best = {"step": step + 1, "value": ev[best_by]}
            best_weights = rt.full_state(model)  # (under FSDP: gathered to the first process, None on the others)

    def checkpoint(step: int, finished: bool = False) -> None:
        target, target_opt = model, opt
        if rt.sharded:  # whole weights and optimizer state, gathered to the first process
            weights, opt_state = rt.full_state(model), rt.full_optimizer_state(model, opt)
            if rt.main:
                target = rt.plain(model, weights, device="cpu")
                target_opt = make_optimizer(target, cfg, torch.device("cpu"))
                target_opt.load_state_dict(opt_state)
        if rt.main:  # the best weights so far travel with the state
            save_state(resume_dir, {"model": target}, {"model": target_opt},
                       {"step": step, "fingerprint": fingerprint_, "curve": curve, "evals": evals, "best": best, "finished": finished},
                       extra={"best": best_weights} if best_weights is not None else None)

    if start == 0 and best_by is not None and eval_fn is not None:  # the starting point competes too
        evaluate(-1)
    # 4. steps. A step's loss and gradient norm stay on the device until the next step has been
    # queued (`read_back(keep=1)`): reading them at once would make the host wait for the GPU
    # to finish the step before it could queue the next, leaving the GPU idle in between. The
    # figures are the same; a diverged step is caught one step later, and everything pending is
    # read (and checked) before an evaluation, a checkpoint or the end, so nothing is written
    # from a diverged run.
    pending: list[dict] = []

    def read_back(keep: int = 0) -> None:
        while len(pending) > keep:
            p = pending.pop(0)
            loss, grad_norm = torch.stack([p.pop("loss").double(), p.pop("grad_norm").double()]).tolist()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise DivergenceError(f"{name}: loss {loss} / gradient norm {grad_norm} at step {p['step']}: the run diverged "
                                      f"(lower {name}.train.lr, now {cfg.lr}, or raise warmup); nothing was written or registered")
            ntok = p.pop("ntok")
            row = {"step": p["step"], "loss": loss, "lr": p["lr"], "grad_norm": grad_norm, **p["extra"]}
            curve.append(row)
            volatile = {"tokens_per_s": ntok * rt.world / max(p.pop("seconds"), 1e-9)}
            if flops_per_token and rt.peak:
                volatile["mfu"] = volatile["tokens_per_s"] * flops_per_token / (rt.peak * 1e12)
            report.log(p["step"] - 1, {k: v for k, v in row.items() if k != "step"} | volatile)

    queued = time.time()
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, ntok, extra = torch.zeros((), device=rt.device, dtype=torch.float64), 0, {}
        for micro in range(local_accum):
            batch = batch_fn(step, rt.rank * local_accum + micro)
            sync = micro == local_accum - 1 or rt.world == 1  # DDP averages gradients over processes once, at the last
            with contextlib.nullcontext() if sync else rt.no_sync(model):
                with rt.autocast:  # forward in bf16 on CUDA; the backward pass follows outside autocast
                    loss, extra = loss_fn(model, batch)
                (loss / local_accum).backward()
            loss_sum += loss.detach().double() / local_accum
            ntok += tokens_in(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the step's time: from the end of the previous step's queueing to the end of this
        # one's (an evaluation or checkpoint in between not counted): once the host waits for
        # the GPU a step behind, that is the GPU's time for a step
        now = time.time()
        seconds, queued = now - queued, now
        pending.append({"step": step + 1, "loss": rt.all_mean(loss_sum), "grad_norm": local(grad_norm).detach(), "lr": lr,
                        "extra": extra, "ntok": ntok, "seconds": seconds})
        last = step + 1 == cfg.steps
        evaluating = eval_fn is not None and ((step + 1) % cfg.eval_every == 0 or last)
        saving = (step + 1) % cfg.ckpt_every == 0 and not last
        read_back(keep=0 if (evaluating or saving or last or on_step is not None) else 1)
        if evaluating:
            evaluate(step)
        if saving:
            checkpoint(step + 1)
        if on_step is not None:
            on_step(step + 1)
        if evaluating or saving or on_step is not None:
            queued = time.time()
    check_finite(model, name)
    if cfg.steps > start:
        checkpoint(cfg.steps, finished=True)
    history = {"curve": curve, "evals": evals, "first_loss": curve[0]["loss"] if curve else None,
               "final": curve[-1] if curve else {}, "resumed_from": start, "best": best, "steps": cfg.steps}
    if rt.sharded:  # the first process gets the whole model back as an ordinary module; the others their shards
        if best is not None:  # (the same on every process) the best weights are already whole on the first
            result = rt.plain(model, best_weights) if rt.main else None
        else:
            result = rt.plain(model)
        return (result if rt.main else unwrap(model)), history
    if best_weights is not None:
        unwrap(model).load_state_dict(best_weights)
    return unwrap(model), history


def seeded(*parts: int) -> torch.Generator:
    """A generator seeded by integers (seed, step, micro-batch, rank, ...): the data a step
    sees depends on nothing else, which is what makes resumed runs repeat unbroken ones."""
    return torch.Generator().manual_seed(hash(parts) & 0x7FFF_FFFF_FFFF)  # int tuples hash stably
