"""Several processes: a training stage that relaunches itself under torchrun (DDP on gloo here),
checked against the same stage on one process, and the settings that must fail early.

- `python -m tasks.pretrain` with `pretrain.compute.nproc_per_node: 2` trains the weights one
  process trains with the same global batch (within rounding), and writes, tracks and registers
  once (rank 0 alone: one MLflow run, one registered version);
- two "nodes" (the same command started twice in one folder, one process each) meet at a c10d
  rendezvous address and train the same weights;
- a grad_accum that does not divide over the processes, several processes for a sampling stage,
  several nodes without a rendezvous address, an address that does not resolve or does not
  answer: one error naming the setting, exit code 2, nothing written.

    pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, tiny_raw_params

TEXTS = [f"def function_{i}(value): return value + {i} # the answer number {i} is here" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tasks.lib.bpe import train_bpe

    d = tmp_path_factory.mktemp("tok")
    train_bpe(iter(TEXTS), 300, 2).save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def pretrain_project(root: Path, tokenizer_file: Path, **compute) -> Path:
    """A folder with what pretrain reads (a tokenizer, token files of a repeating sequence) and a
    params.yaml: 6 steps of 4 micro-batches."""
    from tasks.lib.tokens import token_dtype

    raw = tiny_raw_params()
    raw["pretrain"].update(seq_len=32, sample_tokens=4)
    raw["pretrain"]["train"].update(steps=6, grad_accum=4, lr=0.01, eval_every=6, ckpt_every=3)
    raw["pretrain"]["compute"].update(compute)
    (root / "models/tokenizer").mkdir(parents=True)
    (root / "models/tokenizer/tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    vocab = len(json.loads(tokenizer_file.read_text())["model"]["vocab"])
    cycle = np.random.default_rng(0).choice(np.arange(20, vocab), size=37, replace=False)
    tokens = root / "data/tokens"
    tokens.mkdir(parents=True)
    dt = token_dtype(vocab)
    np.tile(cycle, 100).astype(dt).tofile(tokens / "train.bin")
    np.tile(cycle, 10).astype(dt).tofile(tokens / "val.bin")
    (tokens / "meta.json").write_text(json.dumps({"dtype": dt.name, "vocab_size": vocab,
                                                  "splits": {"train": {"tokens": 3700}, "val": {"tokens": 370}}}))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def run_pretrain(root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tasks.pretrain"], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def tracked(root: Path) -> tuple[int, int]:
    """(stage runs, registered versions of `base`) in the folder's own MLflow database."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return len(runs), len(client.search_model_versions("name='base'"))


@pytest.fixture(scope="module")
def one(tmp_path_factory, tokenizer_file) -> Path:
    """pretrain on one process: the reference of the distributed runs."""
    root = pretrain_project(tmp_path_factory.mktemp("one"), tokenizer_file)
    res = run_pretrain(root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrain_on_two_processes_trains_the_weights_of_one_and_writes_once(one, tmp_path, tokenizer_file, strategy):
    two = pretrain_project(tmp_path / "two", tokenizer_file, nproc_per_node=2, strategy=strategy)
    r2 = run_pretrain(two)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"2 processes (2 per node x 1 node(s)) under torchrun, {strategy.upper()}" in r2.stderr
    w1, w2 = weights(one / "models/base"), weights(two / "models/base")
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-4, f"2 processes drifted from 1 by {diff}"
    m1, m2 = (json.loads((d / "reports/pretrain.json").read_text()) for d in (one, two))
    assert m2["tokens_seen"] == m1["tokens_seen"] == 6 * 4 * 4 * 32  # the global batch, not x2
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], abs=1e-4)
    assert tracked(two) == tracked(one) == (1, 1)  # rank 1 neither tracks nor registers
    assert json.loads((two / "models/base/config.json").read_text())["stage"] == "pretrain"


@pytest.mark.slow
def test_two_nodes_meet_at_the_rendezvous_and_train_the_weights_of_one(one, tmp_path, tokenizer_file):
    """Two "nodes" on this machine (the same command started twice in one folder: what a shared
    filesystem gives real nodes), one process each, meeting at a c10d rendezvous address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = pretrain_project(tmp_path / "nodes", tokenizer_file, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "tasks.pretrain"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
        assert "2 processes (1 per node x 2 node(s)) under torchrun" in err
    w1, w2 = weights(one / "models/base"), weights(root / "models/base")
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-4, f"2 nodes drifted from 1 process by {diff}"
    assert tracked(root) == (1, 1)  # the node that got rank 0 alone tracks and registers


def main_of(root: Path, capsys, monkeypatch) -> tuple[int, str]:
    from tasks import pretrain
    from tasks.stage import main

    monkeypatch.chdir(root)
    code = main(pretrain, ["--params", "params.yaml"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("compute", "train", "named"), [
    ({"nproc_per_node": 2}, {"grad_accum": 3}, "pretrain.train.grad_accum = 3 does not divide over pretrain.compute's 2 processes"),
    ({"nproc_per_node": 2, "nnodes": 2}, {"grad_accum": 4}, "nnodes = 2 needs rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "gpu-node-0.invalid:29500"}, {"grad_accum": 2}, "rdzv_endpoint = gpu-node-0.invalid:29500: the host"),
    # TEST-NET-1 (RFC 5737): routable nowhere, so nothing answers
    ({"nnodes": 2, "rdzv_endpoint": "192.0.2.1:29500", "rdzv_timeout": 2}, {"grad_accum": 2}, "192.0.2.1:29500 does not answer after"),
])
def test_a_distributed_setting_that_cannot_work_is_one_error(tmp_path, tokenizer_file, capsys, monkeypatch, compute, train, named):
    root = pretrain_project(tmp_path, tokenizer_file, **compute)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["pretrain"]["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, err = main_of(root, capsys, monkeypatch)
    assert code == 2 and named in err, err
    assert "Traceback" not in err and not (root / "models/base").exists() and not (root / "reports/pretrain.json").exists()


@pytest.mark.parametrize(("stage", "compute", "named"), [
    ("evaluate", {"nproc_per_node": 4}, "evaluate.compute runs on one process (nproc_per_node and nnodes must be 1, not 4 and 1)"),
    ("ppo", {"nproc_per_node": 3}, "ppo.batch_prompts = 4 does not divide over ppo.compute's 3 processes"),
    ("group_rl", {"nproc_per_node": 2, "strategy": "fsdp"}, "group_rl.compute.strategy = fsdp: only the training stages"),
])
def test_a_sampling_stage_that_cannot_split_is_refused_by_name(tmp_path, tokenizer_file, capsys, monkeypatch, stage, compute, named):
    root = pretrain_project(tmp_path, tokenizer_file)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw[stage]["compute"].update(compute)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, err = main_of(root, capsys, monkeypatch)
    assert code == 2 and named in err, err


def test_torchrun_lines_for_one_node_and_several():
    from tasks.config import parse_params
    from tasks.stage import torchrun_command

    raw = tiny_raw_params()
    raw["sft"]["compute"].update(nproc_per_node=8)
    raw["reward"]["compute"].update(nproc_per_node=4, nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_timeout=120)
    p = parse_params(raw)
    assert torchrun_command(p.sft.compute, "tasks.sft", ["--params", "x.yaml"])[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=1", "--standalone", "-m", "tasks.sft", "--params", "x.yaml"]
    assert torchrun_command(p.reward.compute, "tasks.reward", [])[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400",
        "--rdzv_id=tasks.reward", "--rdzv_conf=join_timeout=120", "-m", "tasks.reward"]
    assert p.reward.compute.world == 8
