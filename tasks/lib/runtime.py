"""Device, precision and distributed context of one process.

`Runtime(compute)` takes any object with `device` (auto | cpu | cuda), `dtype`
(auto | float32 | bfloat16), `compile` and `peak_tflops` (the `compute` block of a stage in
params.yaml). `auto` means CUDA with bf16 autocast when there is a GPU, fp32 on the CPU.
Under `torchrun` (WORLD_SIZE > 1) it joins the process group: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

# Dense bf16 peak FLOP/s of common accelerators, for MFU (override with compute.peak_tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}


class Runtime:
    def __init__(self, compute: Any):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        want = compute.device if compute.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if want == "cuda" and not torch.cuda.is_available():
            from tasks.lib.errors import StageError

            raise StageError("compute.device is 'cuda' but no CUDA GPU is visible (use 'auto' or 'cpu')")
        self.device = torch.device(f"cuda:{local}" if want == "cuda" else "cpu")
        if want == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want == "cuda" else "gloo")
        use_bf16 = compute.dtype == "bfloat16" or (compute.dtype == "auto" and want == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.dtype_name = "bfloat16" if use_bf16 else "float32"
        self.compile = bool(getattr(compute, "compile", False))
        self.peak = getattr(compute, "peak_tflops", None)
        if self.peak is None and want == "cuda":
            name = torch.cuda.get_device_name(self.device)
            self.peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def compiled(self) -> bool:
        """torch.compile is used for the model and the decode step: only on CUDA (on CPU it costs
        tens of seconds of compilation and gave no speedup here)."""
        return self.compile and self.device.type == "cuda"

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.compiled:
            model = torch.compile(model)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def all_mean(self, value):
        """The mean over processes of a float, or of a tensor (averaged on the device, without
        waiting for it: a float would be read back)."""
        if self.world == 1:
            return value
        if isinstance(value, torch.Tensor):
            t = value.detach().to(torch.float64).clone()
            dist.all_reduce(t)
            return (t / self.world).to(value.dtype)
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def same_everywhere(self, value: int) -> bool:
        """Whether every process holds this integer (True on one process)."""
        if self.world == 1:
            return True
        t = torch.tensor([value, -value], device=self.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == value and int(t[1]) == -value

    def describe(self) -> dict[str, str]:
        return {"runtime.device": str(self.device), "runtime.dtype": self.dtype_name, "runtime.world_size": str(self.world)}


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)
