"""Device, precision and distributed context of one process.

`Runtime(compute)` takes any object with `device` (auto | cpu | cuda), `dtype`
(auto | float32 | bfloat16), `compile` and `peak_tflops` (the `compute` block of a stage in
params.yaml). `auto` means CUDA with bf16 autocast when there is a GPU, fp32 on the CPU.
Under `torchrun` (WORLD_SIZE > 1) it joins the process group: gloo on CPU, nccl on CUDA,
and `wrap` replicates the model (DDP, `compute.strategy: ddp`) or shards its weights, gradients
and optimizer state over the processes (FSDP2's `fully_shard`, `compute.strategy: fsdp`: each
transformer block, then the rest). Under FSDP the whole weights exist only when gathered:
`full_state` / `plain` gather them to the first process (checkpoints and the returned model
hold whole weights, so a run resumes on any number of processes, with or without sharding),
and `load_sharded` spreads whole weights and optimizer state from the first process back over
the shards. Every process must make those calls together.
"""

from __future__ import annotations

import contextlib
import copy
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
        self.strategy = getattr(compute, "strategy", "ddp")
        self.sharded = self.world > 1 and self.strategy == "fsdp"
        self._skeletons: dict[int, nn.Module] = {}  # id of a sharded model -> its shape on the meta device
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
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            self._skeletons[id(model)] = meta_copy(model)
            # one unit per transformer block (gathered for its own forward and backward, freed
            # after), the embeddings, head and final norm in the root unit
            for block in [b for lst in model.modules() if isinstance(lst, nn.ModuleList) for b in lst]:
                fully_shard(block)
            fully_shard(model)
        if self.compiled:
            model = torch.compile(model)
        if self.world > 1 and not self.sharded:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Gradients kept local for a micro-batch that is not the step's last (DDP's no_sync;
        FSDP's reduce-scatter held back). On one process: nothing to hold back."""
        if self.world == 1:
            return contextlib.nullcontext()
        if not self.sharded:
            return model.no_sync()
        raw = unwrap(model)

        @contextlib.contextmanager
        def held():
            raw.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                raw.set_requires_gradient_sync(True)

        return held()

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """A copy of the whole weights on the CPU: on every process for a replicated model;
        under FSDP gathered to the first process (None on the others)."""
        raw = unwrap(model)
        if not self.sharded:
            return {k: v.detach().to("cpu", copy=True) for k, v in raw.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.main else None

    def full_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
        """The optimizer's whole state as a plain optimizer over the same parameters would give
        it (`state_dict()`, parameters numbered in order): gathered to the first process under
        FSDP (None on the others)."""
        if not self.sharded:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        index: dict[str, int] = {}  # parameter name -> its number in a plain optimizer's state_dict
        groups = [{**g, "params": [index.setdefault(n, len(index)) for n in g["params"]]} for g in osd["param_groups"]]
        return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}

    def load_sharded(self, model: nn.Module, opt: torch.optim.Optimizer, weights: dict | None, opt_state: dict | None) -> None:
        """Whole weights and a plain optimizer state held by the first process, spread over the
        shards of every process (the others pass None)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        raw = unwrap(model)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(raw, weights if self.main else {}, options=options)
        named: dict = {}
        if self.main:
            names = {id(p): n for n, p in raw.named_parameters()}
            order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
            named = {"state": {order[int(i)]: s for i, s in opt_state["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
        set_optimizer_state_dict(raw, opt, named, options=options)

    def plain(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None, device: torch.device | str | None = None) -> nn.Module | None:
        """The model as an ordinary module holding whole weights (`state`, else the model's own,
        gathered: every process must call it then): the model itself when it is not sharded;
        under FSDP a new module on the first process and None on the others."""
        if not self.sharded:
            raw = unwrap(model)
            if state is not None:
                raw.load_state_dict(state)
            return raw
        if state is None:
            state = self.full_state(model)
        if not self.main:
            return None
        out = copy.deepcopy(self._skeletons[id(unwrap(model))])
        aliases: dict[int, list[str]] = {}  # tied weights: several names of one parameter
        for n, p in out.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        out.load_state_dict(state, assign=True)
        for names in aliases.values():
            first = out.get_parameter(names[0])
            for n in names[1:]:
                owner, _, leaf = n.rpartition(".")
                setattr(out.get_submodule(owner), leaf, first)
        return out.to(device or self.device)

    def all_mean(self, value):
        """The mean over processes of a float, or of a tensor (averaged on the device, without
        waiting for it: a float would be read back)."""
        if self.world == 1:
            return value
        if isinstance(value, torch.Tensor):
            return (self.all_sum(value.detach().to(torch.float64)) / self.world).to(value.dtype)
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the processes (a new tensor; itself on one process)."""
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D tensor, concatenated in process order (lengths may differ)."""
        if self.world == 1:
            return t
        n = torch.tensor([t.numel()], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(sizes))
        padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t.detach().reshape(-1)
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)])

    def broadcast(self, obj: Any) -> Any:
        """The first process's value of a small picklable object, on every process."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

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
        return {"runtime.device": str(self.device), "runtime.dtype": self.dtype_name, "runtime.world_size": str(self.world),
                "runtime.strategy": self.strategy if self.world > 1 else "one process"}


def meta_copy(model: nn.Module) -> nn.Module:
    """The module's structure with its parameters and buffers on the meta device (no memory;
    tied weights stay tied): what a sharded model is gathered back into."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def local(t: torch.Tensor) -> torch.Tensor:
    """A replicated distributed tensor (e.g. FSDP's gradient norm) as a plain one."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)
