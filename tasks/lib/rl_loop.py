"""The one RL loop of the alignment stages: PPO with a value function (InstructGPT) or the
critic-free RLOO / GRPO (a group of K samples per prompt is its own baseline), picked by
`algorithm`. The math lives in tasks/lib/rl.py; this is the order in which it is applied.

Each iteration reads top to bottom:

  1. rollout     sample completions for a batch of prompts from the policy (K per prompt for
                 rloo / grpo); policy and value stay in eval mode (dropout off), so the
                 recomputed log-probs equal the sampling ones and the ratio starts at 1
  2. score       the reward model scores each completion; one that never ends its turn loses
                 `missing_eos_penalty`
  3. KL          per-token log-ratio to the frozen reference; per-token rewards -beta * KL,
                 plus the score at the last token
  4. advantages  ppo: GAE (gamma, lambda) on the value function's estimates, whitened;
                 rloo / grpo: each sequence's total reward (score - beta * its KL) against
                 its group's (tasks/lib/rl.py: group_advantages), the same for all its tokens
  5. update      epochs of minibatches: clipped surrogate (and for ppo the clipped value
                 loss), entropy bonus, optional pretraining loss (PPO-ptx); gradient clipping
  6. control     adaptive KL coefficient (Ziegler et al. 2019), metrics, checkpoint

Returns one row of metrics per iteration, the iterations before a resume included (they
travel in the checkpoint, with the weights, optimizer states and beta).

On W processes (`rt` under torchrun) it is the run of one process, split: every process picks
the same prompts and takes its own 1/W of them (rows r*B/W ... of the batch; a prompt's group
of K stays on one process), samples them with the uniform numbers one process would have used
for those rows (model.sample_next's `rows`), scores them and computes their advantages; the
whitening statistics, the metrics and the KL the controller sees are the whole batch's
(reduced over processes). A minibatch is the same rows as on one process: each process takes
its own rows of it, divides its loss sums by the minibatch's whole token count, and the
gradients are summed over the processes, which gives one process's gradient of the
minibatch's mean (PPO-ptx's pretraining term is the first process's alone, as one process
computes it once). The replicas stay identical, and the weights equal one process's within
floating-point rounding. The first process alone writes checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.lib.rl import (KLController, explained_variance, gae, group_advantages, kl_rewards, masked_mean, policy_loss, sequences,
                          token_logprobs, value_loss, whiten)

ScoreFn = Callable[[list[list[int]], list[list[int]], list[int]], torch.Tensor]  # (prompts, responses, prompt indices) -> (B,)
ALGORITHMS = ("ppo", "rloo", "grpo")


def _opt_cfg(lr: float):
    """The RL optimizers: AdamW without weight decay (as TRL and OpenRLHF)."""
    from types import SimpleNamespace

    return SimpleNamespace(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.95)


def rl_loop(policy, ref, value, score_fn: ScoreFn, prompts: list[list[int]], cfg: Any, *, pad_id: int, stop_ids: tuple[int, ...],
            seed: int, device, algorithm: str = "ppo", group_size: int = 1, resume_dir: Path | None = None, fingerprint: str = "",
            ptx_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
            on_iter: Callable[[int, dict, list[list[int]], list[int]], None] | None = None,
            autocast: contextlib.AbstractContextManager = contextlib.nullcontext(), compile_decode: bool = False, rt=None) -> list[dict]:
    """`cfg`: the stage's section (steps, batch_prompts, sampling, ppo_epochs, minibatches, lr,
    clip, entropy_coef, grad_clip, kl, missing_eos_penalty, ptx_coef, ptx_batch, ckpt_every;
    for ppo also value_lr, value_clip, vf_coef, gamma, lam, whiten_advantages). `value`: the
    value model for ppo, None for rloo / grpo. `autocast`: the forward passes run under it
    (bf16 on CUDA); losses, advantages and the backward pass stay in fp32. `compile_decode`: the
    rollout's decoding step under torch.compile (the stage's compute.compile, on CUDA). `rt`: the
    Runtime, for several processes (None: one). `on_iter(it, row, responses, idx)` runs on every
    process with the whole batch's responses and prompt indices."""
    from tasks.lib.model import generate
    from tasks.lib.train import DivergenceError, load_state_everywhere, make_optimizer, save_state, seeded

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown RL algorithm {algorithm!r} ({', '.join(ALGORITHMS)})")
    critic = algorithm == "ppo"
    if critic == (value is None):
        raise ValueError("ppo needs a value model; rloo and grpo have none")
    K = 1 if critic else group_size
    if not critic and K < 2:
        raise ValueError(f"{algorithm} needs a group of K >= 2 samples per prompt (group_size = {K})")
    W, rank = (rt.world, rt.rank) if rt is not None else (1, 0)
    if cfg.batch_prompts % W:
        raise ValueError(f"batch_prompts {cfg.batch_prompts} does not split over {W} processes")
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.eval()  # dropout off for the whole loop (see step 1)
    opt_pi = make_optimizer(policy, _opt_cfg(cfg.lr), device)
    modules, optimizers = {"policy": policy}, {"policy": opt_pi}
    if critic:
        value.eval()
        opt_v = make_optimizer(value, _opt_cfg(cfg.value_lr), device)
        modules["value"], optimizers["value"] = value, opt_v
    kl_ctl = KLController(cfg.kl.beta, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
    state = load_state_everywhere(rt, resume_dir, modules, optimizers, fingerprint, algorithm) if resume_dir else {}
    start = int(state.get("step", 0))
    kl_ctl.beta = state.get("beta", kl_ctl.beta)
    history: list[dict] = state.get("history", [])
    sp = cfg.sampling
    # ppo's value warm-up: the first iterations fit the value function to the returns of the
    # (still unchanged) policy before the policy moves, so its first advantages are not noise
    warmup = int(getattr(cfg, "value_warmup", 0)) if critic else 0
    total_iters = warmup + cfg.steps
    for it in range(start, total_iters):
        warming = it < warmup
        gen = seeded(seed, it)
        picked = torch.randperm(len(prompts), generator=gen)[: cfg.batch_prompts].tolist()
        if len(picked) < cfg.batch_prompts:
            raise ValueError(f"{len(prompts)} prompts, fewer than batch_prompts {cfg.batch_prompts}")
        # the answer length one process would allow for the whole batch (generate caps it by its own prompts)
        new_tokens = min(sp.max_new_tokens, policy.cfg.max_seq_len - max(len(prompts[i]) for i in picked))
        share = len(picked) // W
        picked = picked[rank * share : (rank + 1) * share]  # this process's prompts
        idx = [i for i in picked for _ in range(K)]  # a group's K samples are neighbours
        batch_prompts = [prompts[i] for i in idx]

        # 1. rollout (on W processes each draws its rows' share of the whole batch's uniforms)
        B_local = len(idx)
        with autocast:
            responses = generate(policy, batch_prompts, new_tokens, pad_id=pad_id, stop_ids=stop_ids,
                                 temperature=sp.temperature, top_p=sp.top_p, generator=gen, compile=compile_decode,
                                 rows=(rank * B_local, W * B_local) if W > 1 else None)
        responses = [r if r else [pad_id] for r in responses]
        x, mask = sequences(batch_prompts, responses, pad_id, device)
        m = mask.float()
        with torch.no_grad():
            # 2. score
            with autocast:
                scores = score_fn(batch_prompts, responses, idx).to(device).float()
                old_logp, _ = token_logprobs(policy, x, sp.temperature)
                ref_logp, _ = token_logprobs(ref, x, sp.temperature)
                old_values = value(x)[:, :-1].float() * m if critic else None
            # unfinished responses (no stop token) lose missing_eos_penalty, as TRL's option
            unfinished = torch.tensor([not (r and r[-1] in stop_ids) for r in responses], device=device)
            scores = scores - cfg.missing_eos_penalty * unfinished.float()
            # 3. KL
            rewards, kl = kl_rewards(old_logp, ref_logp, scores, mask, kl_ctl.beta)
            # 4. advantages
            if critic:
                adv = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
                returns = adv + old_values
                if cfg.whiten_advantages:
                    adv = whiten(adv, m, rt.all_sum) if W > 1 else whiten(adv, m)
            else:
                adv = group_advantages(rewards.sum(1), K, algorithm)[:, None] * m

        # 5. update
        names = ("policy_loss", "entropy", "clip_fraction", "approx_kl", "ptx_loss") + (("value_loss",) if critic else ())
        stats: dict[str, list[float]] = {k: [] for k in names}
        B = B_local * W  # the whole batch's rows; this process holds rows rank*B_local ...
        mb = max(B // cfg.minibatches, 1)
        order_gen = seeded(seed, it, 1)  # the minibatches: the same rows on any number of processes
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=order_gen).tolist()
            for s in range(0, B, mb):
                sel = [r - rank * B_local for r in order[s : s + mb] if rank * B_local <= r < (rank + 1) * B_local]
                xs, ms = x[sel], m[sel]
                # W > 1: each process's sums over its rows, divided by the minibatch's whole count
                count = rt.all_sum(ms.sum()).clamp(min=1) if W > 1 else None
                total = torch.zeros((), device=device)
                figures = torch.zeros(5 if critic else 4, device=device)
                if sel:
                    with autocast:
                        logp, ent = token_logprobs(policy, xs, sp.temperature)
                        v = value(xs)[:, :-1].float() if critic else None
                    pi_loss, ratio = policy_loss(logp, old_logp[sel], adv[sel], ms, cfg.clip, count)
                    entropy = masked_mean(ent, ms, count)
                    if not warming:  # (warming: the value loss alone; the policy's optimizer does not step)
                        total = pi_loss - cfg.entropy_coef * entropy
                    if critic:
                        v_loss = value_loss(v, old_values[sel], returns[sel], ms, cfg.value_clip, count)
                    with torch.no_grad():
                        figures = torch.stack([pi_loss, entropy, masked_mean(((ratio - 1).abs() > cfg.clip).float(), ms, count),
                                               masked_mean(0.5 * (logp - old_logp[sel]) ** 2, ms, count)]
                                              + ([v_loss] if critic else [])).detach()
                if not warming and ptx_fn is not None and cfg.ptx_coef > 0 and rank == 0:  # PPO-ptx: keep the pretraining distribution
                    px, py = ptx_fn(it * 1000 + epoch * 100 + s)
                    with autocast:
                        ptx = policy(px.to(device), py.to(device))[1].float()
                    total = total + cfg.ptx_coef * ptx
                    stats["ptx_loss"].append(float(ptx.detach()))
                if critic and sel:
                    total = total + cfg.vf_coef * v_loss
                finite = torch.isfinite(total.detach())
                if W > 1:  # one process's non-finite loss stops every process, with the same error
                    finite = rt.all_sum((~finite).float()) == 0
                if not finite:
                    raise DivergenceError(f"{algorithm}: non-finite loss at iteration {it + 1} (lower the learning rates); "
                                          "nothing was written or registered")
                stepping = ["value"] if warming else list(optimizers)
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                if total.requires_grad:
                    total.backward()
                if W > 1:  # the replicas step with the whole minibatch's gradient
                    _sum_gradients([modules[n] for n in stepping], rt)
                    figures = rt.all_sum(figures)
                for name in stepping:
                    torch.nn.utils.clip_grad_norm_(modules[name].parameters(), cfg.grad_clip)
                    optimizers[name].step()
                for name, value_ in zip(names[:4] + names[5:], figures.tolist()):
                    stats[name].append(value_)

        # 6. control, metrics, checkpoint (figures of the whole batch, over every process)
        seq_kl = kl.sum(1)
        if W > 1:
            responses, idx = _gather_lists(responses, rt), _gather_lists(idx, rt)
            scores, seq_kl = rt.all_gather(scores), rt.all_gather(seq_kl)
            stats["ptx_loss"] = rt.broadcast(stats["ptx_loss"])  # the first process's
        mean_kl = float(seq_kl.mean())
        n = len(responses)
        if not warming:  # the policy did not move: nothing for beta to react to
            kl_ctl.update(mean_kl, n)
        row = {
            "iteration": it + 1, "phase": "value_warmup" if warming else "policy",
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if n > 1 else 0.0,
            "kl": mean_kl, "beta": kl_ctl.beta,
            "response_length": float(np.mean([len(r) for r in responses])),
            "finished_fraction": float(np.mean([bool(r) and r[-1] in stop_ids for r in responses])),
            **{k: float(np.mean(v)) for k, v in stats.items() if v},
        }
        if critic:
            if W == 1:
                row["explained_variance"] = explained_variance(old_values, returns, m)
            else:  # over every process's valid positions
                keep = m.bool()
                vals, rets = rt.all_gather(old_values[keep]), rt.all_gather(returns[keep])
                row["explained_variance"] = explained_variance(vals, rets, torch.ones_like(vals))
        if on_iter is not None:  # may add metrics of its own to row
            on_iter(it, row, responses, idx)
        history.append(row)
        if resume_dir is not None and rank == 0 and ((it + 1) % cfg.ckpt_every == 0 or it + 1 == total_iters):
            save_state(resume_dir, modules, optimizers, {"step": it + 1, "beta": kl_ctl.beta, "fingerprint": fingerprint,
                                                         "history": history, "finished": it + 1 == total_iters})
    return history


def _sum_gradients(modules: list, rt) -> None:
    """Every parameter's gradient summed over the processes, in one flat all-reduce (a
    parameter without a gradient counts as zero, so every process sends the same layout)."""
    params = [p for mod in modules for p in mod.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = rt.all_sum(flat)
    offset = 0
    for p in params:
        g = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _gather_lists(items: list, rt) -> list:
    """Every process's list, concatenated in process order."""
    import torch.distributed as dist

    out: list = [None] * rt.world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]
