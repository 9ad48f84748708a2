"""reward: a reward model trained on ranked completions; registered model `reward`.

    python -m tasks.reward              # what `dvc repro reward` runs

Initialised from the SFT transformer with a new scalar head. Each completion is read as
prompt + completion + `<|reward|>` and its reward is the head's output at that readout
token. For a prompt with K ranked completions, every pair (w better than l) of the C(K,2)
contributes `-log sigmoid(r_w - r_l)`, averaged per batch; all pairs of one prompt share a
batch (InstructGPT). Tied pairs (equal judge scores, or completions a labeler ranked
equal) carry no preference and are skipped, and so are pairs with a completion a labeler
flagged as unusable. The weights of the best pairwise accuracy on the validation prompts
are kept (a small RM overfits after about an epoch); the accuracy reported as the RM's
(`test_accuracy`) is measured on test prompts that took no part in that choice, beside the
validation figure it was selected on and the training accuracy. The output is normalised
(mean 0, std 1 on the training completions) inside the model, so that its scores, PPO's
rewards and the value function initialised from it share one scale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.rl import rewards_of
from tasks.lib.storage import atomic_dir, write_json

STAGE = "reward"
PARAMS = ("seed", "instructions", "reward")
INPUTS = ("sft", "preferences")
OUTPUTS = ("reward", "checkpoints", "report")


def load_prompts(path: Path, template, max_len: int) -> list[dict]:
    """Per prompt: token ids of each completion as the RM reads it (prompt, completion, its
    end of turn when it finished, the readout token), and the ordered pairs
    (tasks/lib/rankings.py: read_pairs, the same pairs DPO learns from)."""
    from tasks.lib.rankings import read_pairs

    out = []
    for r in read_pairs(path):
        prompt = template.prompt(r["prompt"])
        seqs = [template.scored(prompt, template.text_ids(text) + ([template.end_turn] if fin else []), max_len)
                for text, fin in zip(r["completions"], r["finished"])]
        out.append({"seqs": seqs, "pairs": r["pairs"]})
    return out


def pair_loss(model, prompts: list[dict], pad_id: int) -> tuple[torch.Tensor, float]:
    seqs, w_idx, l_idx = [], [], []
    for p in prompts:
        base = len(seqs)
        seqs += p["seqs"]
        w_idx += [base + a for a, _ in p["pairs"]]
        l_idx += [base + b for _, b in p["pairs"]]
    r = rewards_of(model, seqs, pad_id)
    margin = r[w_idx] - r[l_idx]
    return -F.logsigmoid(margin).mean(), float((margin > 0).float().mean())


@torch.no_grad()
def accuracy(model, prompts: list[dict], pad_id: int, batch: int = 8) -> float:
    correct = total = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        _, acc = pair_loss(model, chunk, pad_id)
        n = sum(len(p["pairs"]) for p in chunk)
        correct += acc * n
        total += n
    return correct / max(total, 1)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    from tasks.lib import registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.model import load_checkpoint, save_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template
    from tasks.lib.train import fingerprint, seeded, train_loop

    tc = params.reward.train
    # 1. data and model: the scalar head starts random, so seed before it is built
    torch.manual_seed(params.seed)
    model, _ = load_checkpoint(inputs["sft"], kind="scalar")
    t = Template(load_tokenizer(inputs["sft"]))
    train = load_prompts(inputs["preferences"] / "train.jsonl", t, model.cfg.max_seq_len)
    val = load_prompts(inputs["preferences"] / "val.jsonl", t, model.cfg.max_seq_len)
    test = load_prompts(inputs["preferences"] / "test.jsonl", t, model.cfg.max_seq_len)
    if not train or not val or not test:
        raise StageError(f"no untied preference pairs (train prompts {len(train)}, val prompts {len(val)}, test prompts {len(test)})")
    rt = Runtime(params.reward.compute)

    def batch_fn(step: int, micro: int):  # micro: the step's micro-batch, counted over all processes
        gen = seeded(params.seed, step, micro, 0)  # 0: as in runs from before micro-batches were counted over processes
        return [train[i] for i in torch.randint(0, len(train), (tc.batch_size,), generator=gen).tolist()]

    def loss_fn(m, batch):
        loss, acc = pair_loss(m, batch, t.pad)
        return loss, {"train_pair_accuracy": acc}

    def eval_fn(m, step: int) -> dict:
        return {"val_accuracy": accuracy(m, val, t.pad)}

    # 2. train
    fp = fingerprint([params.seed, params.reward.train.model_dump(), params.instructions.model_dump()], code_hash(f"tasks.{STAGE}"),
                     content_hash([inputs["sft"], inputs["preferences"]]))
    # the RM overfits its small data after about an epoch (InstructGPT trains one): the
    # weights of the best held-out accuracy are kept
    model, hist = train_loop(STAGE, model, tc, rt, batch_fn, loss_fn, lambda b: sum(len(s) for p in b for s in p["seqs"]),
                             outputs["checkpoints"], fp, eval_fn=eval_fn, seed=params.seed, best_by="val_accuracy")
    if not rt.main:  # the other processes of a DDP run trained only
        return {}
    # 3. normalise: rewards of the training completions get mean 0 and std 1, folded into the
    # model, so its scores, PPO's rewards and the value function it initialises share units
    model.eval()
    with torch.no_grad():
        all_r = torch.cat([rewards_of(model, p["seqs"], t.pad) for p in train])
    stats = {"reward_mean": float(all_r.mean()), "reward_std": float(all_r.std().clamp(min=1e-6))}
    model.normalise(stats["reward_mean"], stats["reward_std"])
    val_acc = hist["best"]["value"]
    # 4. write
    from tasks.lib.rankings import labeler_kind

    labeler = labeler_kind(inputs["preferences"] / f"{s}.jsonl" for s in ("train", "val", "test"))
    with atomic_dir(outputs["reward"]) as out:
        save_checkpoint(out, model, inputs["sft"], {"stage": STAGE, "val_accuracy": val_acc, "labeler": labeler, **stats})
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "train.json", hist["curve"])
        write_json(rep / "val.json", hist["evals"])
    tracking.set_tags({**rt.describe(), "resumed_from": hist["resumed_from"]})
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, "labeler": labeler, **registry.parent_tags("sft", inputs["sft"])}
    initial = hist["evals"][0]["val_accuracy"]  # step 0: the SFT body with a random head
    with torch.no_grad():
        train_acc = accuracy(model, train, t.pad)
        test_acc = accuracy(model, test, t.pad)
    card = registry.model_card("reward", STAGE, {k.removeprefix("input."): v for k, v in tracking.input_hashes(inputs).items()},
                               {"steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.lr, "train_prompts": len(train)},
                               {"test_accuracy": test_acc, "val_accuracy (selected on)": val_acc, "train_accuracy": train_acc}, labeler)
    tracking.set_tags({"registered_version": f"reward/{registry.register_checkpoint('reward', outputs['reward'], tags, card)}"})
    return {
        "test_accuracy": test_acc, "test_pairs": sum(len(p["pairs"]) for p in test), "test_prompts": len(test),
        "val_accuracy": val_acc, "val_accuracy_before": initial, "train_accuracy": train_acc, "best_step": hist["best"]["step"],
        "val_accuracy_last": hist["evals"][-1]["val_accuracy"],
        "train_loss": hist["final"].get("loss"), "first_train_loss": hist["first_loss"],
        "train_prompts": len(train), "val_prompts": len(val),
        "val_pairs": sum(len(p["pairs"]) for p in val), **stats,
        "steps": tc.steps,
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
