"""pretrain: next-token prediction on the token files; registered model `base`.

    python -m tasks.pretrain                              # what `dvc repro pretrain` runs
    (pretrain.compute.nproc_per_node: 8 -> it relaunches itself under torchrun: DDP, same global batch)

1. data      B random windows of T+1 tokens from `data/tokens/train.bin`, drawn from a
             generator seeded by (seed, step, micro-batch): a resumed run, or one on another
             number of processes, sees the same data
2. model     the GPT of `model` in params.yaml, vocabulary from the tokenizer
3. train     the shared loop (tasks/lib/train.py); validation loss on fixed windows of
             `val.bin` and sample generations (to MLflow) at each evaluation
4. write     `models/base/` (safetensors + config + tokenizer), the training curves in
             `reports/pretrain/` (DVC plots), the registered version `base`

The metrics compare the final validation loss with the unigram entropy of the training
tokens (what a model that ignores context would reach).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.model import GPT, ModelConfig
from tasks.lib.storage import atomic_dir, write_json
from tasks.lib.tokens import token_files, unigram_entropy, windows
from tasks.lib.train import seeded

STAGE = "pretrain"
PARAMS = ("seed", "model", "pretrain")
INPUTS = ("tokens", "tokenizer")
OUTPUTS = ("base", "checkpoints", "report")


def model_config(params: Params, vocab_size: int) -> ModelConfig:
    m = params.model
    return ModelConfig(vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, max_seq_len=m.max_seq_len,
                       mlp_ratio=m.mlp_ratio, positions=m.positions, tie_embeddings=m.tie_embeddings, dropout=m.dropout)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    import mlflow

    from tasks.lib import registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.model import save_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import complete
    from tasks.lib.train import fingerprint, train_loop

    cfg, tc = params.pretrain, params.pretrain.train
    # 1. data
    train, val, meta = token_files(inputs["tokens"])
    tok = load_tokenizer(inputs["tokenizer"])
    seq_len = cfg.seq_len or params.model.max_seq_len
    if seq_len > params.model.max_seq_len:
        raise StageError(f"pretrain.seq_len {seq_len} exceeds model.max_seq_len {params.model.max_seq_len}")
    if len(val) <= 8:
        raise StageError(f"{inputs['tokens']}/val.bin has {len(val)} tokens: too few to validate on (raise mix.val_fraction)")
    val_len = min(seq_len, len(val) - 2)

    def batch_fn(step: int, micro: int):  # micro: the step's micro-batch, counted over all processes
        # 0: the draws of runs from before micro-batches were counted over processes
        return windows(train, tc.batch_size, seq_len, seeded(params.seed, step, micro, 0))

    # 2. model
    torch.manual_seed(params.seed)
    model = GPT(model_config(params, meta["vocab_size"]))
    rt = Runtime(cfg.compute)

    def loss_fn(m, batch):
        x, y = batch
        return m(x.to(rt.device), y.to(rt.device))[1], {}

    def eval_fn(m, step: int) -> dict:
        losses = [float(m(x.to(rt.device), y.to(rt.device))[1])
                  for x, y in (windows(val, tc.batch_size, val_len, seeded(params.seed, -1, i)) for i in range(tc.eval_batches))]
        samples = complete(m, tok, cfg.sample_prompts, chat=False, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=params.seed)
        if mlflow.active_run():
            mlflow.log_text("\n\n".join(f"### {p!r}\n{p}{s}" for p, s in zip(cfg.sample_prompts, samples)), f"samples/step_{step + 1:06d}.md")
        return {"val_loss": float(np.mean(losses))}

    # 3. train
    fp = fingerprint([params.seed, params.model.model_dump(), cfg.model_dump(exclude={"compute"})], code_hash(f"tasks.{STAGE}"),
                     content_hash([inputs["tokens"], inputs["tokenizer"]]))
    model, hist = train_loop(STAGE, model, tc, rt, batch_fn, loss_fn, lambda b: b[0].numel(), outputs["checkpoints"],
                             fp, eval_fn=eval_fn, flops_per_token=model.flops_per_token(seq_len), seed=params.seed)
    if not rt.main:  # the other processes of a DDP run trained only
        return {}
    # 4. write
    entropy = unigram_entropy(train, meta["vocab_size"])
    final_val = hist["evals"][-1]["val_loss"]
    with atomic_dir(outputs["base"]) as out:
        save_checkpoint(out, model, inputs["tokenizer"], {"stage": STAGE, "chat": False, "val_loss": final_val})
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "train.json", hist["curve"])
        write_json(rep / "val.json", hist["evals"])
    tracking.set_tags({**rt.describe(), "resumed_from": hist["resumed_from"]})
    hashes = tracking.input_hashes(inputs)
    card = registry.model_card("base", STAGE, {k.removeprefix("input."): v for k, v in hashes.items()},
                               {"params": model.num_params(), "layers": params.model.n_layer, "d_model": params.model.d_model,
                                "tokens": tc.steps * tc.batch_size * tc.grad_accum * seq_len, "lr": tc.lr},
                               {"val_loss": final_val, "unigram_entropy": entropy})
    version = registry.register_checkpoint("base", outputs["base"], {**tracking.git_commit(), **hashes, "stage": STAGE}, card)
    tracking.set_tags({"registered_version": f"base/{version}"})
    return {
        "val_loss": final_val,
        "train_loss": hist["final"].get("loss"),
        "first_train_loss": hist["first_loss"],
        "unigram_entropy": entropy,
        "val_loss_below_unigram": entropy - final_val,
        "tokens_seen": tc.steps * tc.batch_size * tc.grad_accum * seq_len,  # the global batch, on any number of processes
        "num_params": model.num_params(),
        "flops_per_token": model.flops_per_token(seq_len),
        "steps": tc.steps,
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
