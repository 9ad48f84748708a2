"""ppo: RLHF of the SFT policy against the reward model; registered model `rlhf`.

    python -m tasks.ppo                 # what `dvc repro ppo` runs

Policy and frozen reference from SFT; value function initialised from the reward model;
the reward of a completion is the reward model's score at `<|reward|>` (normalised with the
mean/std saved by the reward stage) minus `beta * KL(policy || reference)` per token. Each
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
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks.config import PPO, Params
from tasks.storage import StageError, atomic_dir

STAGE = "ppo"
PARAMS = ("seed", "instructions", "preferences", "ppo")
INPUTS = ("sft", "reward", "tokens")
OUTPUTS = ("rlhf",)

log = logging.getLogger(STAGE)
ScoreFn = Callable[[list[list[int]], list[list[int]], list[int]], torch.Tensor]  # (prompts, responses, prompt indices) -> (B,)


def sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response tokens (B, T) and the response mask in prediction space
    (B, T-1): position j is True when it predicts a response token."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        x[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = True
    return x.to(device), mask.to(device)


def token_logprobs(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x[j+1] | x[:j+1]) and the entropy of each prediction, both (B, T-1)."""
    logits = model(x)[0][:, :-1].float()
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, x[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (v * m).sum() / m.sum().clamp(min=1)


def whiten(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(v, m)
    var = masked_mean((v - mean) ** 2, m)
    return (v - mean) * torch.rsqrt(var + 1e-8) * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over the response positions of each row."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    T = rewards.shape[1]
    m = mask.float()
    for j in reversed(range(T)):
        nxt_m = m[:, j + 1] if j + 1 < T else torch.zeros_like(last)
        nxt_v = values[:, j + 1] * nxt_m if j + 1 < T else torch.zeros_like(last)
        delta = rewards[:, j] + gamma * nxt_v - values[:, j]
        last = delta + gamma * lam * last * nxt_m
        adv[:, j] = last * m[:, j]
    return adv


class KLController:
    """Fixed beta, or adaptive: moves beta so the measured KL tracks the target."""

    def __init__(self, beta: float, adaptive: bool, target: float, horizon: int):
        self.beta, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.beta *= 1 + error * n_steps / self.horizon


def ppo_loop(policy, ref, value, score_fn: ScoreFn, prompts: list[list[int]], cfg: PPO, *, pad_id: int,
             stop_ids: tuple[int, ...], seed: int, device, resume_dir: Path | None = None, fingerprint: str = "",
             ptx_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
             on_iter: Callable[[int, dict, list[list[int]], list[int]], None] | None = None,
             autocast: contextlib.AbstractContextManager = contextlib.nullcontext()) -> list[dict]:
    """`autocast`: the forward passes run under it (bf16 on CUDA); losses, advantages and
    the backward pass stay in fp32."""
    from tasks.model import generate
    from tasks.train import make_optimizer, seeded

    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt_pi = make_optimizer(policy, _as_train(cfg, cfg.lr), device)
    opt_v = make_optimizer(value, _as_train(cfg, cfg.value_lr), device)
    kl_ctl = KLController(cfg.kl.beta, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
    start = _load_state(resume_dir, policy, value, opt_pi, opt_v, kl_ctl, fingerprint) if resume_dir else 0
    history: list[dict] = []
    for it in range(start, cfg.steps):
        gen = seeded(seed, it)
        idx = torch.randperm(len(prompts), generator=gen)[: cfg.batch_prompts].tolist()
        batch_prompts = [prompts[i] for i in idx]

        # 1. rollout
        policy.eval()  # dropout off while sampling and scoring
        with autocast:
            responses = generate(policy, batch_prompts, cfg.max_new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                                 temperature=cfg.temperature, generator=gen)
        responses = [r if r else [pad_id] for r in responses]
        x, mask = sequences(batch_prompts, responses, pad_id, device)
        m = mask.float()
        with torch.no_grad():
            # 2. score
            with autocast:
                scores = score_fn(batch_prompts, responses, idx).to(device).float()
                old_logp, _ = token_logprobs(policy, x)
                ref_logp, _ = token_logprobs(ref, x)
                old_values = value(x)[:, :-1].float() * m
            # 3. KL
            kl = (old_logp - ref_logp) * m
            rewards = -kl_ctl.beta * kl
            last = (mask.long().cumsum(1) == mask.sum(1, keepdim=True)) & mask  # last response position
            rewards = rewards + last.float() * scores[:, None]
            # 4. advantages
            adv = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            returns = adv + old_values
            if cfg.whiten_advantages:
                adv = whiten(adv, m)

        # 5. update
        policy.train()
        value.train()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "ptx_loss")}
        B = x.shape[0]
        mb = max(B // cfg.minibatches, 1)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist()
            for s in range(0, B, mb):
                sel = order[s : s + mb]
                xs, ms = x[sel], m[sel]
                with autocast:
                    logp, ent = token_logprobs(policy, xs)
                    v = value(xs)[:, :-1].float()
                ratio = torch.exp(logp - old_logp[sel])
                pg = torch.max(-adv[sel] * ratio, -adv[sel] * ratio.clamp(1 - cfg.clip, 1 + cfg.clip))
                policy_loss = masked_mean(pg, ms)
                entropy = masked_mean(ent, ms)
                loss_pi = policy_loss - cfg.entropy_coef * entropy
                if ptx_fn is not None and cfg.ptx_coef > 0:  # PPO-ptx: keep the pretraining distribution
                    px, py = ptx_fn(it * 1000 + epoch * 100 + s)
                    with autocast:
                        ptx = policy(px.to(device), py.to(device))[1].float()
                    loss_pi = loss_pi + cfg.ptx_coef * ptx
                    stats["ptx_loss"].append(float(ptx))
                v_clipped = old_values[sel] + (v - old_values[sel]).clamp(-cfg.value_clip, cfg.value_clip)
                value_loss = 0.5 * masked_mean(torch.max((v - returns[sel]) ** 2, (v_clipped - returns[sel]) ** 2), ms)
                opt_pi.zero_grad(set_to_none=True)
                opt_v.zero_grad(set_to_none=True)
                (loss_pi + cfg.vf_coef * value_loss).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.grad_clip)
                opt_pi.step()
                opt_v.step()
                with torch.no_grad():
                    stats["policy_loss"].append(float(policy_loss))
                    stats["value_loss"].append(float(value_loss))
                    stats["entropy"].append(float(entropy))
                    stats["clip_fraction"].append(float(masked_mean(((ratio - 1).abs() > cfg.clip).float(), ms)))
                    stats["approx_kl"].append(float(masked_mean(0.5 * (logp - old_logp[sel]) ** 2, ms)))

        # 6. control, metrics, checkpoint
        mean_kl = float((kl.sum(1)).mean())
        kl_ctl.update(mean_kl, B)
        resid = masked_mean((returns - old_values) ** 2, m)
        var_ret = masked_mean((returns - masked_mean(returns, m)) ** 2, m)
        row = {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if B > 1 else 0.0,
            "kl": mean_kl, "beta": kl_ctl.beta,
            "explained_variance": float(1 - resid / var_ret.clamp(min=1e-8)),
            "response_length": float(np.mean([len(r) for r in responses])),
            "finished_fraction": float(np.mean([bool(r) and r[-1] in stop_ids for r in responses])),
            **{k: float(np.mean(v)) for k, v in stats.items() if v},
        }
        if on_iter is not None:  # may add metrics of its own to row
            on_iter(it, row, responses, idx)
        history.append(row)
        if resume_dir is not None and ((it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.steps):
            _save_state(resume_dir, policy, value, opt_pi, opt_v, kl_ctl, it + 1, fingerprint)
    return history


def _as_train(cfg: PPO, lr: float):
    from tasks.config import TrainConfig

    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_prompts, lr=lr, weight_decay=0.0, grad_clip=cfg.grad_clip)


def _save_state(folder: Path, policy, value, opt_pi, opt_v, kl_ctl: KLController, step: int, fingerprint: str) -> None:
    from safetensors.torch import save_model

    with atomic_dir(folder) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))
        save_model(value, str(tmp / "value.safetensors"))
        torch.save({"policy": opt_pi.state_dict(), "value": opt_v.state_dict()}, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "beta": kl_ctl.beta, "fingerprint": fingerprint}))


def _load_state(folder: Path, policy, value, opt_pi, opt_v, kl_ctl: KLController, fingerprint: str) -> int:
    from safetensors.torch import load_model

    state_file = folder / "state.json"
    if not state_file.is_file():
        return 0
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        return 0
    load_model(policy, str(folder / "policy.safetensors"))
    load_model(value, str(folder / "value.safetensors"))
    opts = torch.load(folder / "optimizers.pt", weights_only=True)
    opt_pi.load_state_dict(opts["policy"])
    opt_v.load_state_dict(opts["value"])
    kl_ctl.beta = state["beta"]
    log.info("resuming PPO from iteration %d", state["step"])
    return int(state["step"])


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks import instructions, registry, tracking
    from tasks.chat import Template
    from tasks.judge import gold_score
    from tasks.model import load_checkpoint, save_checkpoint
    from tasks.pretrain import token_files, windows
    from tasks.train import seeded
    from tasks.reward import rewards_of
    from tasks.tokenizer import load_tokenizer
    from tasks.train import Reporter, Runtime, fingerprint_of

    cfg = params.ppo
    rt = Runtime(cfg)
    torch.manual_seed(params.seed)
    policy, sft_info = load_checkpoint(inputs["sft"], rt.device)
    ref, _ = load_checkpoint(inputs["sft"], rt.device)
    value, rm_info = load_checkpoint(inputs["reward"], rt.device)
    scorer, _ = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    t = Template(load_tokenizer(inputs["sft"]))
    examples = [ex for ex in instructions.splits(params.instructions, params.seed)["ppo"]
                if len(t.prompt(ex["messages"][0]["content"])) <= params.instructions.max_prompt_tokens]
    if len(examples) < cfg.batch_prompts:
        raise StageError(f"only {len(examples)} usable prompts in the 'ppo' split, fewer than ppo.batch_prompts={cfg.batch_prompts}")
    prompts = [t.prompt(ex["messages"][0]["content"]) for ex in examples]
    mean, std = rm_info["reward_mean"], rm_info["reward_std"]
    gold: list[float] = []

    def score_fn(ps, rs, idx) -> torch.Tensor:
        with torch.no_grad():
            r = rewards_of(scorer, [t.scored(p, [tok for tok in resp if tok != t.pad]) for p, resp in zip(ps, rs)], t.pad)
        gold.clear()
        gold.extend(gold_score(t.decode(resp), examples[i]["messages"][1]["content"], bool(resp) and resp[-1] == t.end_turn,
                               params.preferences.repetition_penalty, params.preferences.unfinished_penalty) for resp, i in zip(rs, idx))
        return (r - mean) / std

    ptx_fn = None
    if cfg.ptx_coef > 0:
        train_tokens, _, _ = token_files(inputs["tokens"])
        ptx_fn = lambda k: windows(train_tokens, cfg.ptx_batch, policy.cfg.max_seq_len - 1, seeded(params.seed, k))  # noqa: E731

    report = Reporter(STAGE, cfg.steps, True, every_s=5.0)
    samples: list[str] = []

    def on_iter(it: int, row: dict, responses: list[list[int]], idx: list[int]) -> None:
        row["gold_score"] = float(np.mean(gold)) if gold else float("nan")
        report.log(it, row)
        if it % 10 == 0 or it + 1 == cfg.steps:
            samples.append(f"### iteration {it + 1}: {examples[idx[0]]['messages'][0]['content']}\n{t.decode(responses[0])}")

    fp = fingerprint_of(params.seed, cfg.model_dump(), sft_info.get("val_loss"), rm_info.get("val_accuracy"))
    hist = ppo_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=t.pad, stop_ids=(t.end_turn, t.eot), seed=params.seed,
                    device=rt.device, resume_dir=Path(params.paths.checkpoints) / STAGE, fingerprint=fp, ptx_fn=ptx_fn, on_iter=on_iter,
                    autocast=rt.autocast)
    import mlflow

    if mlflow.active_run() and samples:
        mlflow.log_text("\n\n".join(samples), "samples/ppo.md")
    with atomic_dir(outputs["rlhf"]) as out:
        save_checkpoint(out, policy, inputs["sft"], {"stage": STAGE, "chat": True})
    k = max(len(hist) // 5, 1)  # start vs end: means over the first and last fifth of iterations
    first, last = hist[:k], hist[-k:]
    mean_of = lambda rows, key: float(np.nanmean([r.get(key, float("nan")) for r in rows]))  # noqa: E731
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": STAGE,
            "parent_model": f"sft/{registry.version_of('sft', inputs['sft'])}", "reward_model": f"reward/{registry.version_of('reward', inputs['reward'])}"}
    metrics: dict[str, Any] = {f"{key}_{when}": mean_of(rows, key) for key in ("reward_mean", "kl", "gold_score", "entropy", "response_length")
                               for when, rows in (("start", first), ("end", last))}
    metrics.update(final_beta=hist[-1]["beta"] if hist else cfg.kl.beta, iterations=cfg.steps, prompts=len(prompts))
    metrics["registered_version"] = registry.register_checkpoint("rlhf", outputs["rlhf"], tags)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
