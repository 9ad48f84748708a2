"""dpo: Direct Preference Optimization of the SFT policy on the K-way rankings; registered as
`rlhf` (tag `method: dpo`).

    python -m tasks.dpo                 # what `dvc repro dpo` runs

1. data       the preference files the reward model learns from, through the same reader
              (tasks/lib/rankings.py: read_pairs): every usable pair of each ranking (ties,
              flagged completions and equal judge scores excluded); train, val and test prompts
2. reference  the frozen SFT model's log-probability of every completion, computed once
3. train      the shared loop (tasks/lib/train.py) from the SFT weights: per batch of prompts,
              all their pairs; loss `dpo.loss`: sigmoid (Rafailov et al. 2023, with
              `label_smoothing` for conservative DPO) or ipo (Azar et al. 2023), on summed or,
              with `length_normalise`, per-token log-probabilities (Tulu 3); evaluated every
              `eval_every` steps on the validation pairs (loss, implicit reward margin
              beta * h, accuracy = share of pairs with h > 0) and by the KL of the policy to the
              reference on held-out prompts (samples of the policy, mean summed log-ratio)
4. write      `models/dpo/`, curves in `reports/dpo/`, registered as `rlhf` (method dpo);
              metrics on the test pairs, which took no part in training or selection
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_dir, write_json

STAGE = "dpo"
PARAMS = ("seed", "instructions", "dpo")
INPUTS = ("sft", "preferences")
OUTPUTS = ("dpo", "checkpoints", "report")


def encode(records: list[dict], template, max_len: int) -> list[dict]:
    """Per prompt: its ids and each completion's ids (with its end of turn when it finished),
    the prompt's start cut where prompt + completion would not fit the context."""
    out = []
    for r in records:
        prompt = template.prompt(r["prompt"])
        comps = [template.text_ids(c) + ([template.end_turn] if f else []) for c, f in zip(r["completions"], r["finished"])]
        longest = max(len(c) for c in comps)
        if longest >= max_len:
            comps = [c[: max_len - 1] for c in comps]
            longest = max_len - 1
        out.append({"prompt": prompt[-(max_len - longest) :], "comps": comps, "pairs": r["pairs"]})
    return out


def completion_logprobs(model, items: list[dict], pad_id: int, device, length_normalise: bool, batch: int = 32) -> list[torch.Tensor]:
    """Per prompt, the (K,) log-probabilities of its completions."""
    from tasks.lib.rl import sequence_logprobs

    rows = [(i, it["prompt"], c) for i, it in enumerate(items) for c in it["comps"]]
    vals = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        vals.append(sequence_logprobs(model, [p for _, p, _ in chunk], [c for _, _, c in chunk], pad_id, device, length_normalise))
    flat = torch.cat(vals)
    out, pos = [], 0
    for it in items:
        out.append(flat[pos : pos + len(it["comps"])])
        pos += len(it["comps"])
    return out


def pair_loss(model, items: list[dict], ref: list[torch.Tensor], cfg, pad_id: int, device) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO loss over every pair of these prompts, and its accuracy and mean implicit reward margin."""
    from tasks.lib.rl import dpo_loss

    pol = completion_logprobs(model, items, pad_id, device, cfg.length_normalise)
    pw, pl, rw, rl_ = [], [], [], []
    for p, r, it in zip(pol, ref, items):
        w = [a for a, _ in it["pairs"]]
        lo = [b for _, b in it["pairs"]]
        pw.append(p[w])
        pl.append(p[lo])
        rw.append(r[w])
        rl_.append(r[lo])
    loss, h = dpo_loss(torch.cat(pw), torch.cat(pl), torch.cat(rw).to(device), torch.cat(rl_).to(device), cfg.beta,
                       cfg.label_smoothing, cfg.loss == "ipo")
    return loss, {"accuracy": float((h > 0).float().mean()), "margin": float(cfg.beta * h.detach().mean())}


@torch.no_grad()
def evaluate_pairs(model, items, ref, cfg, pad_id, device, batch: int = 16) -> dict[str, float]:
    total = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    n = 0
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        k = sum(len(it["pairs"]) for it in chunk)
        loss, extra = pair_loss(model, chunk, ref[s : s + batch], cfg, pad_id, device)
        total["loss"] += float(loss) * k
        total["accuracy"] += extra["accuracy"] * k
        total["margin"] += extra["margin"] * k
        n += k
    return {key: v / max(n, 1) for key, v in total.items()}


@torch.no_grad()
def kl_to_reference(policy, ref, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_ids, seed: int, device) -> float:
    """Mean over samples of the policy (temperature 1) of the summed log-ratio log pi - log ref."""
    from tasks.lib.model import generate
    from tasks.lib.rl import sequences, token_logprobs

    responses = generate(policy, prompts, max_new_tokens, pad_id=pad_id, stop_ids=stop_ids, temperature=1.0,
                         generator=torch.Generator().manual_seed(seed))
    x, mask = sequences(prompts, [r or [pad_id] for r in responses], pad_id, device)
    lp, _ = token_logprobs(policy, x)
    lr, _ = token_logprobs(ref, x)
    return float(((lp - lr) * mask).sum(1).mean())


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    from tasks.lib import registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.model import load_checkpoint, save_checkpoint
    from tasks.lib.rankings import read_pairs
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template
    from tasks.lib.train import fingerprint, seeded, train_loop

    cfg, tc = params.dpo, params.dpo.train
    rt = Runtime(cfg.compute)
    # 1. data
    torch.manual_seed(params.seed)
    policy, _ = load_checkpoint(inputs["sft"])
    ref_model, _ = load_checkpoint(inputs["sft"], rt.device)
    ref_model.eval()
    t = Template(load_tokenizer(inputs["sft"]))
    T = policy.cfg.max_seq_len
    data = {s: encode(read_pairs(inputs["preferences"] / f"{s}.jsonl"), t, T) for s in ("train", "val", "test")}
    if not all(data.values()):
        raise StageError("no usable preference pair for DPO in " + ", ".join(f"{s} ({len(v)} prompts)" for s, v in data.items() if not v)
                         + ": every pair was tied or flagged; rank more completions or rerun the preferences stage")
    # 2. reference log-probabilities, once
    with torch.no_grad(), rt.autocast:
        ref = {s: completion_logprobs(ref_model, v, t.pad, rt.device, cfg.length_normalise) for s, v in data.items()}
    kl_prompts = [it["prompt"] for it in data["val"][: cfg.kl_prompts]]

    def batch_fn(step: int, micro: int):  # micro: the step's micro-batch, counted over all processes
        gen = seeded(params.seed, step, micro, 0)  # 0: as in runs from before micro-batches were counted over processes
        picked = torch.randint(0, len(data["train"]), (tc.batch_size,), generator=gen).tolist()
        return [data["train"][i] for i in picked], [ref["train"][i] for i in picked]

    def loss_fn(m, batch):
        items, refs = batch
        loss, extra = pair_loss(m, items, refs, cfg, t.pad, rt.device)
        return loss, {"train_accuracy": extra["accuracy"], "train_margin": extra["margin"]}

    def eval_fn(m, step: int) -> dict:
        ev = evaluate_pairs(m, data["val"], ref["val"], cfg, t.pad, rt.device)
        kl = kl_to_reference(m, ref_model, kl_prompts, cfg.kl_max_new_tokens, t.pad, t.stop_ids, params.seed, rt.device)
        return {"val_loss": ev["loss"], "val_accuracy": ev["accuracy"], "val_margin": ev["margin"], "kl_to_reference": kl}

    # 3. train
    fp = fingerprint([params.seed, cfg.model_dump(exclude={"compute"}), params.instructions.model_dump()], code_hash(f"tasks.{STAGE}"),
                     content_hash([inputs["sft"], inputs["preferences"]]))
    policy, hist = train_loop(STAGE, policy, tc, rt, batch_fn, loss_fn, lambda b: sum(len(c) for it in b[0] for c in it["comps"]),
                              outputs["checkpoints"], fp, eval_fn=eval_fn, seed=params.seed)
    if not rt.main:  # the other processes of a DDP run trained only
        return {}
    # 4. write
    policy.eval()
    test = evaluate_pairs(policy, data["test"], ref["test"], cfg, t.pad, rt.device)
    with atomic_dir(outputs["dpo"]) as out:
        save_checkpoint(out, policy, inputs["sft"], {"stage": STAGE, "method": "dpo", "chat": True})
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "train.json", hist["curve"])
        write_json(rep / "val.json", hist["evals"])
    tracking.set_tags({**rt.describe(), "resumed_from": hist["resumed_from"], "method": "dpo"})
    from tasks.lib.rankings import labeler_kind

    labeler = labeler_kind(inputs["preferences"] / f"{s}.jsonl" for s in ("train", "val", "test"))
    last = hist["evals"][-1] if hist["evals"] else {}
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, "method": "dpo", "labeler": labeler,
            **registry.parent_tags("sft", inputs["sft"])}
    card = registry.model_card("rlhf (method dpo)", STAGE, {k.removeprefix("input."): v for k, v in tracking.input_hashes(inputs).items()},
                               {"beta": cfg.beta, "loss": cfg.loss, "steps": tc.steps, "lr": tc.lr}, {"test_accuracy": test["accuracy"],
                                "test_margin": test["margin"], "kl_to_reference": last.get("kl_to_reference")}, labeler)
    # every aligned model is a version of `rlhf` (tag `method`): one champion alias across methods
    tracking.set_tags({"registered_version": f"rlhf/{registry.register_checkpoint('rlhf', outputs['dpo'], tags, card)}"})
    return {
        "method": "dpo", "test_accuracy": test["accuracy"], "test_margin": test["margin"], "test_loss": test["loss"],
        "val_accuracy": last.get("val_accuracy"), "val_margin": last.get("val_margin"), "kl_to_reference": last.get("kl_to_reference"),
        "train_loss": hist["final"].get("loss"), "first_train_loss": hist["first_loss"],
        "train_prompts": len(data["train"]), "train_pairs": int(np.sum([len(it["pairs"]) for it in data["train"]])),
        "test_pairs": int(np.sum([len(it["pairs"]) for it in data["test"]])), "steps": tc.steps,
    }


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
