"""Run by tests/test_training.py under torchrun: a tiny model trained with DDP on gloo."""

import json
import os
from pathlib import Path

import torch

from tasks.lib.model import GPT, ModelConfig
from tasks.lib.train import train_loop
from tests.conftest import runtime, train_cfg

data = torch.randint(0, 40, (4000,), generator=torch.Generator().manual_seed(0))


def batch_fn(step, micro, rank):  # each rank draws its own windows
    g = torch.Generator().manual_seed(step * 100 + rank)
    s = torch.randint(0, 3900, (4,), generator=g)
    chunk = torch.stack([data[i : i + 17] for i in s.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
cfg = train_cfg(20)
rt = runtime("cpu")
out = Path(os.environ["OUT"])
model, hist = train_loop("ddp", model, cfg, rt, batch_fn, lambda m, b: (m(*b)[1], {}), lambda b: b[0].numel(), out / "ckpt", "fp")
rank = int(os.environ["RANK"])
(out / f"rank{rank}.json").write_text(json.dumps({
    "world_size": rt.world, "first_loss": hist["first_loss"], "last_loss": hist["final"]["loss"],
    "param_sum": float(sum(p.double().sum() for p in model.parameters())),
}))
