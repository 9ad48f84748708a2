"""sft: supervised fine-tuning of the base model on conversations; registered model `sft`.

    python -m tasks.sft                 # what `dvc repro sft` runs

Conversations (tasks/instructions.py, split `sft`; validation on `sft_val`) are rendered with
the chat template (tasks/chat.py); the loss is the next-token cross-entropy on assistant
tokens only, prompt tokens masked. Examples longer than `instructions.max_prompt_tokens` /
`max_response_tokens` or the model's context are dropped and counted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.config import Params
from tasks.storage import StageError, atomic_dir

STAGE = "sft"
PARAMS = ("seed", "instructions", "sft")
INPUTS = ("base",)
OUTPUTS = ("sft",)


def encode_examples(examples: list[dict], template, max_prompt: int, max_response: int, max_len: int) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """(ids, loss mask) per usable example, and how many were too long."""
    out, dropped = [], 0
    for ex in examples:
        ids, mask = template.render(ex["messages"])
        n_resp = sum(mask)
        if n_resp == 0 or n_resp > max_response or len(ids) - n_resp > max_prompt or len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, mask))
    return out, dropped


def masked_batch(items: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, loss_mask, right-padded: y is x shifted by one; padding carries no loss."""
    width = max(len(ids) for ids, _ in items) - 1
    x = torch.full((len(items), width), pad_id, dtype=torch.long)
    y = torch.full((len(items), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(items), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(items):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:])
    return x, y, m


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    import mlflow

    from tasks import instructions, registry, tracking
    from tasks.chat import Template, complete
    from tasks.model import load_checkpoint, save_checkpoint
    from tasks.tokenizer import load_tokenizer
    from tasks.train import fingerprint_of, seeded, train_loop

    cfg, ic = params.sft, params.instructions
    model, info = load_checkpoint(inputs["base"])
    tok = load_tokenizer(inputs["base"])
    t = Template(tok)
    data = instructions.splits(ic, params.seed)
    train, dropped = encode_examples(data["sft"], t, ic.max_prompt_tokens, ic.max_response_tokens, model.cfg.max_seq_len)
    val, val_dropped = encode_examples(data["sft_val"], t, ic.max_prompt_tokens, ic.max_response_tokens, model.cfg.max_seq_len)
    if not train or not val:
        raise StageError(f"no usable SFT examples (train {len(train)}, val {len(val)}): check instructions.sources and the length limits")
    tc = cfg.train

    def batch_fn(step: int, micro: int, rank: int):
        gen = seeded(params.seed, step, micro, rank)
        idx = torch.randint(0, len(train), (tc.batch_size,), generator=gen).tolist()
        return masked_batch([train[i] for i in idx], t.pad)

    def loss_fn(m, batch):
        x, y, mask = (b.to(next(m.parameters()).device) for b in batch)
        return m(x, y, loss_mask=mask)[1], {}

    def val_loss(m) -> float:
        dev = next(m.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(val), tc.batch_size):
            x, y, mask = (b.to(dev) for b in masked_batch(val[i : i + tc.batch_size], t.pad))
            n = int(mask.sum())
            total += float(m(x, y, loss_mask=mask)[1]) * n
            count += n
        return total / count

    probe = [ex["messages"][0]["content"] for ex in data["sft_val"][:3]]

    def eval_fn(m, step: int) -> dict:
        answers = complete(m, tok, probe, chat=True, max_new_tokens=48)
        if mlflow.active_run():
            mlflow.log_text("\n\n".join(f"### {q}\n{a}" for q, a in zip(probe, answers)), f"samples/step_{step + 1:06d}.md")
        return {"val_loss": val_loss(m)}

    model.eval()
    with torch.no_grad():
        initial_val = val_loss(model)
    fp = fingerprint_of(params.seed, ic.model_dump(), cfg.model_dump(), info.get("val_loss"))
    model, hist = train_loop(STAGE, model, tc, batch_fn, loss_fn, lambda b: int(b[2].sum()), Path(params.paths.checkpoints) / STAGE,
                             fp, eval_fn=eval_fn, seed=params.seed)
    final_val = hist["evals"][-1]["val_loss"]
    with atomic_dir(outputs["sft"]) as out:
        save_checkpoint(out, model, inputs["base"], {"stage": STAGE, "chat": True, "val_loss": final_val})
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, "parent_model": f"base/{registry.version_of('base', inputs['base'])}"}
    return {
        "val_loss": final_val,
        "val_loss_before": initial_val,
        "train_loss": hist["final"].get("loss"),
        "train_examples": len(train), "val_examples": len(val), "dropped_too_long": dropped + val_dropped,
        "steps": tc.steps, "resumed_from": hist["resumed_from"],
        "registered_version": registry.register_checkpoint("sft", outputs["sft"], tags),
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
