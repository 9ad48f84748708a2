"""pretrain: next-token prediction on the token files; registered model `base`.

    python -m tasks.pretrain                              # what `dvc repro pretrain` runs
    torchrun --nproc_per_node 2 -m tasks.pretrain         # DDP (gloo on CPU, nccl on GPU)

Batches are B random windows of T+1 tokens from `data/tokens/train.bin`, drawn from a
generator seeded by (seed, step, micro-batch, rank), so a resumed run sees the same data.
Validation loss on fixed windows of `val.bin`; sample generations at each evaluation go to
MLflow as text. The metrics compare the final validation loss with the unigram entropy of
the training tokens (what a model that ignores context would reach).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.model import GPT, ModelConfig
from tasks.storage import StageError, atomic_dir
from tasks.train import seeded

STAGE = "pretrain"
PARAMS = ("seed", "model", "pretrain")
INPUTS = ("tokens", "tokenizer")
OUTPUTS = ("base",)


def token_files(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: missing (run the tokenize stage first)")
    meta = json.loads(meta_path.read_text())
    train = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")
    return train, val, meta


def windows(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) <= seq_len + 1:
        raise StageError(f"only {len(data)} tokens: fewer than one window of {seq_len + 1}")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen).tolist()
    chunk = torch.from_numpy(np.stack([data[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]


def unigram_entropy(data: np.ndarray, vocab: int) -> float:
    """Entropy (nats) of the token distribution: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(data), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def model_config(params: Params, vocab_size: int) -> ModelConfig:
    m = params.model
    return ModelConfig(vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, max_seq_len=m.max_seq_len,
                       mlp_ratio=m.mlp_ratio, positions=m.positions, tie_embeddings=m.tie_embeddings, dropout=m.dropout)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    import mlflow

    from tasks import registry, tracking
    from tasks.chat import complete
    from tasks.model import save_checkpoint
    from tasks.tokenizer import load_tokenizer
    from tasks.train import fingerprint_of, train_loop

    cfg = params.pretrain
    train, val, meta = token_files(inputs["tokens"])
    tok = load_tokenizer(inputs["tokenizer"])
    seq_len = cfg.seq_len or params.model.max_seq_len
    if seq_len > params.model.max_seq_len:
        raise StageError(f"pretrain.seq_len {seq_len} exceeds model.max_seq_len {params.model.max_seq_len}")
    torch.manual_seed(params.seed)
    model = GPT(model_config(params, meta["vocab_size"]))
    tc = cfg.train

    def batch_fn(step: int, micro: int, rank: int):
        return windows(train, tc.batch_size, seq_len, seeded(params.seed, step, micro, rank))

    def loss_fn(m, batch):
        x, y = batch
        dev = next(m.parameters()).device
        return m(x.to(dev), y.to(dev))[1], {}

    def eval_fn(m, step: int) -> dict:
        dev = next(m.parameters()).device
        losses = [float(m(x.to(dev), y.to(dev))[1]) for x, y in (windows(val, tc.batch_size, min(seq_len, len(val) - 2), seeded(params.seed, -1, i)) for i in range(tc.eval_batches))]
        samples = complete(m, tok, cfg.sample_prompts, chat=False, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=params.seed)
        if mlflow.active_run():
            mlflow.log_text("\n\n".join(f"### {p!r}\n{p}{s}" for p, s in zip(cfg.sample_prompts, samples)), f"samples/step_{step + 1:06d}.md")
        return {"val_loss": float(np.mean(losses))}

    fp = fingerprint_of(params.seed, params.model.model_dump(), cfg.model_dump(), meta)
    model, hist = train_loop(STAGE, model, tc, batch_fn, loss_fn, lambda b: b[0].numel(), Path(params.paths.checkpoints) / STAGE,
                             fp, eval_fn=eval_fn, flops_per_token=model.flops_per_token(seq_len), seed=params.seed)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    entropy = unigram_entropy(train, meta["vocab_size"])
    final_val = hist["evals"][-1]["val_loss"]
    metrics = {
        "val_loss": final_val,
        "train_loss": hist["final"].get("loss"),
        "first_train_loss": hist["first_loss"],
        "unigram_entropy": entropy,
        "val_loss_below_unigram": entropy - final_val,
        "tokens_per_s": hist["final"].get("tokens_per_s"),
        "tokens_seen": tc.steps * tc.batch_size * tc.grad_accum * seq_len * hist["world_size"],
        "num_params": model.num_params(),
        "flops_per_token": model.flops_per_token(seq_len),
        "steps": tc.steps, "resumed_from": hist["resumed_from"], "world_size": hist["world_size"],
        "dtype": hist["dtype"], "device": hist["device"],
    }
    if "mfu" in hist["final"]:
        metrics["mfu"] = hist["final"]["mfu"]
    with atomic_dir(outputs["base"]) as out:
        save_checkpoint(out, model, inputs["tokenizer"], {"stage": STAGE, "chat": False, "val_loss": final_val})
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE}
    metrics["registered_version"] = registry.register_checkpoint("base", outputs["base"], tags)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
