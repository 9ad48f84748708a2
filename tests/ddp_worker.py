"""Run by tests/test_training.py, alone or under torchrun: a tiny model trained by the shared loop.

Environment: OUT (folder: checkpoints in OUT/ckpt, weights and figures per rank), STOP_AT (optional:
the run is killed after that step, as a crash would, after the checkpoint of that step), STRATEGY
(ddp or fsdp; under fsdp only the first process gets the whole model back and writes it).
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_model

from tasks.lib.model import GPT, ModelConfig, generate
from tasks.lib.train import train_loop
from tests.conftest import runtime, train_cfg

data = torch.randint(0, 40, (4000,), generator=torch.Generator().manual_seed(0))


def batch_fn(step, micro):  # the data of (step, micro) on whichever process draws it
    g = torch.Generator().manual_seed(step * 100 + micro)
    s = torch.randint(0, 3900, (4,), generator=g)
    chunk = torch.stack([data[i : i + 17] for i in s.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def eval_fn(m, step):  # samples before any forward pass (under FSDP the root's weights must be gathered for that)
    out = generate(m, [[1, 2, 3], [4, 5]], 4, pad_id=0, generator=torch.Generator().manual_seed(step))
    x, y = batch_fn(999, 0)
    return {"score": -float(m(x, y)[1]), "sampled": float(sum(map(len, out)))}


def stop(step):
    if os.environ.get("STOP_AT") and step == int(os.environ["STOP_AT"]):
        raise SystemExit(3)


torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
cfg = train_cfg(12, grad_accum=4, ckpt_every=6, warmup_steps=2, eval_every=4)
rt = runtime("cpu", strategy=os.environ.get("STRATEGY") or "ddp")
out = Path(os.environ["OUT"])
held = {}  # what one process holds of the wrapped model's weights (FSDP: its shards)
wrap = rt.wrap
rt.wrap = lambda m: held.setdefault("model", wrap(m))
model, hist = train_loop("ddp", model, cfg, rt, batch_fn, lambda m, b: (m(*b)[1], {}), lambda b: b[0].numel(), out / "ckpt", "fp",
                         on_step=stop, eval_fn=eval_fn, best_by="score")
if rt.main or not rt.sharded:
    save_model(model, str(out / f"rank{rt.rank}.safetensors"))
(out / f"rank{rt.rank}.json").write_text(json.dumps({
    "world_size": rt.world, "first_loss": hist["first_loss"], "last_loss": hist["final"]["loss"], "resumed_from": hist["resumed_from"],
    "losses": [r["loss"] for r in hist["curve"]], "evals": hist["evals"], "best": hist["best"],
    "held": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in held["model"].parameters()),
    "whole": sum(p.numel() for p in model.parameters()),
}))
