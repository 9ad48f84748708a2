"""sft: supervised fine-tuning of the base model on conversations; registered model `sft`.

    python -m tasks.sft                 # what `dvc repro sft` runs

1. data    conversations (tasks/lib/instructions.py, split `sft`; validation on `sft_val`)
           rendered with the chat template; examples longer than
           `instructions.max_prompt_tokens` / `max_response_tokens` or the context are dropped
           and counted
2. train   the shared loop from the base weights; the loss is the next-token cross-entropy
           on assistant tokens only, prompt tokens masked
3. write   `models/sft/`, curves in `reports/sft/`, the registered version `sft`
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_dir, write_json

STAGE = "sft"
PARAMS = ("seed", "instructions", "sft")
INPUTS = ("base",)
OUTPUTS = ("sft", "checkpoints", "report")


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    import mlflow

    from tasks.lib import instructions, registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.model import load_checkpoint, save_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template, complete
    from tasks.lib.train import fingerprint, seeded, train_loop

    cfg, ic, tc = params.sft, params.instructions, params.sft.train
    # 1. data
    model, _ = load_checkpoint(inputs["base"])
    tok = load_tokenizer(inputs["base"])
    t = Template(tok)
    data = instructions.splits(ic, params.seed)
    train, dropped = instructions.encode_examples(data["sft"], t, ic.max_prompt_tokens, ic.max_response_tokens, model.cfg.max_seq_len)
    val, val_dropped = instructions.encode_examples(data["sft_val"], t, ic.max_prompt_tokens, ic.max_response_tokens, model.cfg.max_seq_len)
    if not train or not val:
        raise StageError(f"no usable SFT examples (train {len(train)}, val {len(val)}): check instructions.sources and the length limits")
    rt = Runtime(cfg.compute)

    def batch_fn(step: int, micro: int):  # micro: the step's micro-batch, counted over all processes
        gen = seeded(params.seed, step, micro, 0)  # 0: as in runs from before micro-batches were counted over processes
        idx = torch.randint(0, len(train), (tc.batch_size,), generator=gen).tolist()
        return instructions.masked_batch([train[i] for i in idx], t.pad)

    def loss_fn(m, batch):
        x, y, mask = (b.to(rt.device) for b in batch)
        return m(x, y, loss_mask=mask)[1], {}

    def val_loss(m) -> float:
        total, count = 0.0, 0
        for i in range(0, len(val), tc.batch_size):
            x, y, mask = (b.to(rt.device) for b in instructions.masked_batch(val[i : i + tc.batch_size], t.pad))
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

    # 2. train
    model.eval()
    with torch.no_grad():
        initial_val = val_loss(model)
    fp = fingerprint([params.seed, ic.model_dump(), cfg.model_dump(exclude={"compute"})], code_hash(f"tasks.{STAGE}"), content_hash([inputs["base"]]))
    model, hist = train_loop(STAGE, model, tc, rt, batch_fn, loss_fn, lambda b: int(b[2].sum()), outputs["checkpoints"],
                             fp, eval_fn=eval_fn, seed=params.seed)
    if not rt.main:  # the other processes of a DDP run trained only
        return {}
    # 3. write
    final_val = hist["evals"][-1]["val_loss"]
    with atomic_dir(outputs["sft"]) as out:
        save_checkpoint(out, model, inputs["base"], {"stage": STAGE, "chat": True, "val_loss": final_val})
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "train.json", hist["curve"])
        write_json(rep / "val.json", [{"step": 0, "val_loss": initial_val}, *hist["evals"]])
    tracking.set_tags({**rt.describe(), "resumed_from": hist["resumed_from"]})
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, **registry.parent_tags("base", inputs["base"])}
    card = registry.model_card("sft", STAGE, {k.removeprefix("input."): v for k, v in tracking.input_hashes(inputs).items()},
                               {"steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.lr, "examples": len(train)},
                               {"val_loss": final_val, "val_loss_before": initial_val})
    tracking.set_tags({"registered_version": f"sft/{registry.register_checkpoint('sft', outputs['sft'], tags, card)}"})
    return {
        "val_loss": final_val,
        "val_loss_before": initial_val,
        "train_loss": hist["final"].get("loss"),
        "train_examples": len(train), "val_examples": len(val), "dropped_too_long": dropped + val_dropped,
        "steps": tc.steps,
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
