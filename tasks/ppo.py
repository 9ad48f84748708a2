"""ppo: RLHF of the SFT policy against the reward model; registered model `rlhf`.

    python -m tasks.ppo                 # what `dvc repro ppo` runs

Policy and frozen reference from SFT; value function initialised from the reward model;
the reward of a completion is the reward model's score at `<|reward|>` (normalised inside the
model, so the value function starts in the same units), minus `missing_eos_penalty` when the
response never ends its turn, minus `beta * KL(policy || reference)` per token. Log-probs,
KL and entropy are those of the sampling distribution (logits / temperature), and dropout
stays off, so the ratio is exactly 1 before the first update. Each
iteration of `ppo_loop` reads top to bottom:

  1. rollout     sample completions for a batch of prompts from the policy
  2. score       the reward model scores each finished completion
  3. KL          per-token log-ratio to the reference; per-token rewards -beta*KL, + score at the end
  4. advantages  GAE (gamma, lambda) on the value function's estimates; whitened
  5. update      epochs of minibatches: clipped surrogate, clipped value loss, entropy bonus,
                 optional pretraining loss (PPO-ptx); gradient clipping
  6. control     adaptive KL coefficient (Ziegler et al. 2019), metrics, checkpoint

Metrics every iteration: reward (and the gold judge's score), KL to the reference, beta,
entropy, clip fraction, approx KL, value loss, explained variance, response length.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.config import PPO, Params
from tasks.lib.errors import StageError
from tasks.lib.rl import (KLController, explained_variance, gae, kl_rewards, masked_mean, policy_loss, rewards_of, sequences, token_logprobs,
                          value_loss, whiten)
from tasks.lib.storage import atomic_dir, write_json

STAGE = "ppo"
PARAMS = ("seed", "instructions", "judge", "ppo")
INPUTS = ("sft", "reward", "tokens")
OUTPUTS = ("rlhf", "checkpoints", "report")

log = logging.getLogger(STAGE)
ScoreFn = Callable[[list[list[int]], list[list[int]], list[int]], torch.Tensor]  # (prompts, responses, prompt indices) -> (B,)


def ppo_loop(policy, ref, value, score_fn: ScoreFn, prompts: list[list[int]], cfg: PPO, *, pad_id: int,
             stop_ids: tuple[int, ...], seed: int, device, resume_dir: Path | None = None, fingerprint: str = "",
             ptx_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
             on_iter: Callable[[int, dict, list[list[int]], list[int]], None] | None = None,
             autocast: contextlib.AbstractContextManager = contextlib.nullcontext()) -> list[dict]:
    """Returns one row of metrics per iteration, the iterations before a resume included
    (they are kept in the checkpoint). `autocast`: the forward passes run under it (bf16 on
    CUDA); losses, advantages and the backward pass stay in fp32."""
    from tasks.lib.model import generate
    from tasks.lib.train import load_state, make_optimizer, save_state, seeded

    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.eval()  # dropout off for the whole loop (see step 1)
    value.eval()
    opt_pi = make_optimizer(policy, _opt_cfg(cfg.lr), device)
    opt_v = make_optimizer(value, _opt_cfg(cfg.value_lr), device)
    kl_ctl = KLController(cfg.kl.beta, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
    modules, optimizers = {"policy": policy, "value": value}, {"policy": opt_pi, "value": opt_v}
    state = (load_state(resume_dir, modules, optimizers, fingerprint) if resume_dir else None) or {}
    start = int(state.get("step", 0))
    kl_ctl.beta = state.get("beta", kl_ctl.beta)
    history: list[dict] = state.get("history", [])
    sp = cfg.sampling
    for it in range(start, cfg.steps):
        gen = seeded(seed, it)
        idx = torch.randperm(len(prompts), generator=gen)[: cfg.batch_prompts].tolist()
        batch_prompts = [prompts[i] for i in idx]

        # 1. rollout (policy and value stay in eval mode throughout: with dropout on, the
        # recomputed log-probs would differ from the sampling ones and the ratio would not
        # start at 1, as TRL and OpenRLHF also note)
        with autocast:
            responses = generate(policy, batch_prompts, sp.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                                 temperature=sp.temperature, top_p=sp.top_p, generator=gen)
        responses = [r if r else [pad_id] for r in responses]
        x, mask = sequences(batch_prompts, responses, pad_id, device)
        m = mask.float()
        with torch.no_grad():
            # 2. score
            with autocast:
                scores = score_fn(batch_prompts, responses, idx).to(device).float()
                old_logp, _ = token_logprobs(policy, x, sp.temperature)
                ref_logp, _ = token_logprobs(ref, x, sp.temperature)
                old_values = value(x)[:, :-1].float() * m
            # unfinished responses (no stop token) lose missing_eos_penalty, as TRL's option
            unfinished = torch.tensor([not (r and r[-1] in stop_ids) for r in responses], device=device)
            scores = scores - cfg.missing_eos_penalty * unfinished.float()
            # 3. KL
            rewards, kl = kl_rewards(old_logp, ref_logp, scores, mask, kl_ctl.beta)
            # 4. advantages
            adv = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            returns = adv + old_values
            if cfg.whiten_advantages:
                adv = whiten(adv, m)

        # 5. update
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "ptx_loss")}
        B = x.shape[0]
        mb = max(B // cfg.minibatches, 1)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist()
            for s in range(0, B, mb):
                sel = order[s : s + mb]
                xs, ms = x[sel], m[sel]
                with autocast:
                    logp, ent = token_logprobs(policy, xs, sp.temperature)
                    v = value(xs)[:, :-1].float()
                pi_loss, ratio = policy_loss(logp, old_logp[sel], adv[sel], ms, cfg.clip)
                entropy = masked_mean(ent, ms)
                loss_pi = pi_loss - cfg.entropy_coef * entropy
                if ptx_fn is not None and cfg.ptx_coef > 0:  # PPO-ptx: keep the pretraining distribution
                    px, py = ptx_fn(it * 1000 + epoch * 100 + s)
                    with autocast:
                        ptx = policy(px.to(device), py.to(device))[1].float()
                    loss_pi = loss_pi + cfg.ptx_coef * ptx
                    stats["ptx_loss"].append(float(ptx.detach()))
                v_loss = value_loss(v, old_values[sel], returns[sel], ms, cfg.value_clip)
                total = loss_pi + cfg.vf_coef * v_loss
                if not torch.isfinite(total):
                    from tasks.lib.train import DivergenceError

                    raise DivergenceError(f"ppo: non-finite loss at iteration {it + 1} (lower ppo.lr / ppo.value_lr); nothing was written or registered")
                opt_pi.zero_grad(set_to_none=True)
                opt_v.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.grad_clip)
                opt_pi.step()
                opt_v.step()
                with torch.no_grad():
                    stats["policy_loss"].append(float(pi_loss))
                    stats["value_loss"].append(float(v_loss))
                    stats["entropy"].append(float(entropy))
                    stats["clip_fraction"].append(float(masked_mean(((ratio - 1).abs() > cfg.clip).float(), ms)))
                    stats["approx_kl"].append(float(masked_mean(0.5 * (logp - old_logp[sel]) ** 2, ms)))

        # 6. control, metrics, checkpoint
        mean_kl = float((kl.sum(1)).mean())
        kl_ctl.update(mean_kl, B)
        row = {
            "iteration": it + 1,
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if B > 1 else 0.0,
            "kl": mean_kl, "beta": kl_ctl.beta,
            "explained_variance": explained_variance(old_values, returns, m),
            "response_length": float(np.mean([len(r) for r in responses])),
            "finished_fraction": float(np.mean([bool(r) and r[-1] in stop_ids for r in responses])),
            **{k: float(np.mean(v)) for k, v in stats.items() if v},
        }
        if on_iter is not None:  # may add metrics of its own to row
            on_iter(it, row, responses, idx)
        history.append(row)
        if resume_dir is not None and ((it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.steps):
            save_state(resume_dir, modules, optimizers, {"step": it + 1, "beta": kl_ctl.beta, "fingerprint": fingerprint,
                                                         "history": history, "finished": it + 1 == cfg.steps})
    return history


def _opt_cfg(lr: float):
    """PPO's optimizers: AdamW without weight decay (as TRL and OpenRLHF)."""
    from types import SimpleNamespace

    return SimpleNamespace(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.95)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    from tasks.lib import instructions, registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.judge import Judge
    from tasks.lib.model import load_checkpoint, save_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template
    from tasks.lib.tokens import token_files, windows
    from tasks.lib.train import Reporter, check_finite, fingerprint, seeded

    cfg, jd = params.ppo, params.judge
    rt = Runtime(cfg.compute)
    # 1. models: policy and frozen reference from SFT, value and scorer from the reward model
    torch.manual_seed(params.seed)
    policy, _ = load_checkpoint(inputs["sft"], rt.device)
    ref, _ = load_checkpoint(inputs["sft"], rt.device)
    value, _ = load_checkpoint(inputs["reward"], rt.device)  # in the RM's (normalised) units
    scorer, _ = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    t = Template(load_tokenizer(inputs["sft"]))
    # 2. prompts
    splits = instructions.splits(params.instructions, params.seed)
    judge = Judge([(ex["messages"][0]["content"], ex["messages"][1]["content"]) for split in splits.values() for ex in split],
                  jd.repetition_penalty, jd.unfinished_penalty, jd.contrast_references)
    examples = [ex for ex in splits["ppo"] if len(t.prompt(ex["messages"][0]["content"])) <= params.instructions.max_prompt_tokens]
    if len(examples) < cfg.batch_prompts:
        raise StageError(f"only {len(examples)} usable prompts in the 'ppo' split, fewer than ppo.batch_prompts={cfg.batch_prompts}")
    prompts = [t.prompt(ex["messages"][0]["content"]) for ex in examples]
    gold: list[float] = []
    max_len = scorer.cfg.max_seq_len

    def score_fn(ps, rs, idx) -> torch.Tensor:
        """The reward model's score (normalised inside the model): no readout past the context."""
        with torch.no_grad():
            r = rewards_of(scorer, [t.scored(p, [tok for tok in resp if tok != t.pad], max_len) for p, resp in zip(ps, rs)], t.pad)
        gold.clear()
        gold.extend(judge.scores([t.decode(resp) for resp in rs], [examples[i]["messages"][0]["content"] for i in idx],
                                 [examples[i]["messages"][1]["content"] for i in idx],
                                 [bool(resp) and resp[-1] == t.end_turn for resp in rs]).tolist())
        return r

    ptx_fn = None
    if cfg.ptx_coef > 0:
        train_tokens, _, _ = token_files(inputs["tokens"])
        ptx_fn = lambda k: windows(train_tokens, cfg.ptx_batch, policy.cfg.max_seq_len - 1, seeded(params.seed, k))  # noqa: E731

    # 3. the PPO loop
    report = Reporter(STAGE, cfg.steps, True, every_s=5.0)
    samples: list[str] = []
    logged: set[int] = set()

    def on_iter(it: int, row: dict, responses: list[list[int]], idx: list[int]) -> None:
        row["gold_score"] = float(np.mean(gold)) if gold else float("nan")
        row["sqrt_kl"] = float(np.sqrt(max(row["kl"], 0.0)))  # Gao et al.: gold and RM score against sqrt(KL)
        report.log(it, {k: v for k, v in row.items() if k != "iteration"})
        logged.add(it)
        if it % 10 == 0 or it + 1 == cfg.steps:
            samples.append(f"### iteration {it + 1}: {examples[idx[0]]['messages'][0]['content']}\n{t.decode(responses[0])}")

    fp = fingerprint([params.seed, cfg.model_dump(exclude={"compute"}), params.instructions.model_dump(), jd.model_dump()],
                     code_hash(f"tasks.{STAGE}"), content_hash([inputs["sft"], inputs["reward"]] + ([inputs["tokens"]] if cfg.ptx_coef > 0 else [])))
    hist = ppo_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=t.pad, stop_ids=t.stop_ids, seed=params.seed,
                    device=rt.device, resume_dir=outputs["checkpoints"], fingerprint=fp, ptx_fn=ptx_fn, on_iter=on_iter,
                    autocast=rt.autocast)
    report.replay([r for r in hist if r["iteration"] - 1 not in logged], key="iteration")  # iterations before a resume
    check_finite(policy, STAGE)
    # 4. write
    import mlflow

    if mlflow.active_run() and samples:
        mlflow.log_text("\n\n".join(samples), "samples/ppo.md")
    with atomic_dir(outputs["rlhf"]) as out:
        save_checkpoint(out, policy, inputs["sft"], {"stage": STAGE, "chat": True})
    with atomic_dir(outputs["report"]) as rep:
        write_json(rep / "iterations.json", hist)
    k = max(len(hist) // 5, 1)  # start vs end: means over the first and last fifth of iterations
    first, last = hist[:k], hist[-k:]
    mean_of = lambda rows, key: float(np.nanmean([r.get(key, float("nan")) for r in rows]))  # noqa: E731
    tracking.set_tags(rt.describe())
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE, **registry.parent_tags("sft", inputs["sft"])}
    reward_version = registry.version_of("reward", inputs["reward"])
    tags["reward_model"] = f"reward/{reward_version}" if reward_version else f"sha256:{registry.checkpoint_sha(inputs['reward'])}"
    tracking.set_tags({"registered_version": f"rlhf/{registry.register_checkpoint('rlhf', outputs['rlhf'], tags)}"})
    metrics: dict[str, Any] = {f"{key}_{when}": mean_of(rows, key) for key in ("reward_mean", "kl", "gold_score", "entropy", "response_length")
                               for when, rows in (("start", first), ("end", last))}
    metrics.update(final_beta=hist[-1]["beta"] if hist else cfg.kl.beta, iterations=cfg.steps, prompts=len(prompts),
                   coverage=instructions.coverage(examples), kl_target=cfg.kl.target if cfg.kl.adaptive else None)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
