"""reward: a reward model trained on ranked completions; registered model `reward`.

    python -m tasks.reward              # what `dvc repro reward` runs

Initialised from the SFT transformer with a new scalar head. Each completion is read as
prompt + completion + `<|reward|>` and its reward is the head's output at that readout
token. For a prompt with K ranked completions, every pair (w better than l) of the C(K,2)
contributes `-log sigmoid(r_w - r_l)`, averaged per batch; all pairs of one prompt share a
batch (InstructGPT). Tied pairs carry no preference and are skipped. Metrics: pairwise
accuracy on held-out prompts (and on training prompts); the mean and std of the rewards of
training completions are saved in the checkpoint to normalise rewards in PPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.config import Params
from tasks.storage import StageError, atomic_dir

STAGE = "reward"
PARAMS = ("seed", "instructions", "reward")
INPUTS = ("sft", "preferences")
OUTPUTS = ("reward",)


def load_prompts(path: Path, template, max_len: int) -> list[dict]:
    """Per prompt: token ids of each completion as the RM reads it, and the ordered pairs."""
    if not path.is_file():
        raise StageError(f"{path}: missing (run the preferences stage first)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt = template.prompt(r["prompt"])
        seqs = []
        for text, fin in zip(r["completions"], r.get("finished", [True] * len(r["completions"]))):
            comp = template.text_ids(text) + ([template.end_turn] if fin else [])
            seqs.append(template.scored(prompt, comp)[-max_len:])
        rank = {c: i for i, c in enumerate(r["ranking"])}
        scores = r.get("scores")
        pairs = [(a, b) if rank[a] < rank[b] else (b, a) for a in range(len(seqs)) for b in range(a + 1, len(seqs))
                 if scores is None or scores[a] != scores[b]]
        if pairs:
            out.append({"seqs": seqs, "pairs": pairs})
    return out


def rewards_of(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Reward of each sequence: the scalar head at its last token (the readout token)."""
    from tasks.model import padded_batch

    dev = next(model.parameters()).device
    x, valid = padded_batch(seqs, pad_id, left=False, device=dev)
    values = model(x)  # right padding + causal attention: padding never reaches real tokens
    last = valid.sum(1) - 1
    return values[torch.arange(len(seqs), device=dev), last].float()  # fp32 even under bf16 autocast


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


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks import registry, tracking
    from tasks.chat import Template
    from tasks.model import load_checkpoint, save_checkpoint
    from tasks.tokenizer import load_tokenizer
    from tasks.train import fingerprint_of, seeded, train_loop

    tc = params.reward.train
    # the scalar head starts random: seed before it is built, or two runs train different models
    torch.manual_seed(params.seed)
    model, info = load_checkpoint(inputs["sft"], kind="scalar")
    t = Template(load_tokenizer(inputs["sft"]))
    train = load_prompts(inputs["preferences"] / "train.jsonl", t, model.cfg.max_seq_len)
    val = load_prompts(inputs["preferences"] / "val.jsonl", t, model.cfg.max_seq_len)
    if not train or not val:
        raise StageError(f"no untied preference pairs (train prompts {len(train)}, val prompts {len(val)})")

    def batch_fn(step: int, micro: int, rank: int):
        gen = seeded(params.seed, step, micro, rank)
        return [train[i] for i in torch.randint(0, len(train), (tc.batch_size,), generator=gen).tolist()]

    def loss_fn(m, batch):
        loss, acc = pair_loss(m, batch, t.pad)
        return loss, {"train_pair_accuracy": acc}

    def eval_fn(m, step: int) -> dict:
        return {"val_accuracy": accuracy(m, val, t.pad)}

    model.eval()
    initial = accuracy(model, val, t.pad)
    fp = fingerprint_of(params.seed, tc.model_dump(), info.get("val_loss"), (inputs["preferences"] / "train.jsonl").stat().st_size)
    model, hist = train_loop(STAGE, model, tc, batch_fn, loss_fn, lambda b: sum(len(s) for p in b for s in p["seqs"]),
                             Path(params.paths.checkpoints) / STAGE, fp, eval_fn=eval_fn, seed=params.seed)
    model.eval()
    with torch.no_grad():
        all_r = torch.cat([rewards_of(model, p["seqs"], t.pad) for p in train])
    stats = {"reward_mean": float(all_r.mean()), "reward_std": float(all_r.std().clamp(min=1e-6))}
    val_acc = hist["evals"][-1]["val_accuracy"]
    with atomic_dir(outputs["reward"]) as out:
        save_checkpoint(out, model, inputs["sft"], {"stage": STAGE, "val_accuracy": val_acc, **stats})
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, "parent_model": f"sft/{registry.version_of('sft', inputs['sft'])}"}
    return {
        "val_accuracy": val_acc, "val_accuracy_before": initial, "train_accuracy": accuracy(model, train, t.pad),
        "train_loss": hist["final"].get("loss"), "first_train_loss": hist["first_loss"],
        "train_prompts": len(train), "val_prompts": len(val),
        "val_pairs": sum(len(p["pairs"]) for p in val), **stats,
        "steps": tc.steps, "resumed_from": hist["resumed_from"],
        "registered_version": registry.register_checkpoint("reward", outputs["reward"], tags),
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
