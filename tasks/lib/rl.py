"""The math of preference alignment: PPO, the critic-free RLOO and GRPO, and DPO.

Each piece is a small function so tests can pin it with hand-computed values:

- `sequences`        prompt + response rows, right-padded, and the response mask
- `token_logprobs`   log-probabilities and entropies of the sampled tokens, under the
                     sampling temperature (the distribution the tokens were drawn from)
- `rewards_of`       the reward model's score, read at each sequence's final (readout) token
- `kl_rewards`       per-token rewards: -beta * (log pi - log pi_ref), the score at the last token
- `gae`              generalised advantage estimates; `whiten`, `masked_mean`
- `policy_loss`      the clipped surrogate objective (PPO), as a loss to minimise
- `value_loss`       the clipped value loss
- `KLController`     fixed or adaptive KL coefficient (Ziegler et al. 2019)
- `group_advantages` critic-free, sequence-level advantages of K samples per prompt: RLOO's
                     leave-one-out baseline or GRPO's group mean and standard deviation
- `sequence_logprobs` summed (or length-normalised) log-probabilities of completions
- `dpo_loss`         Direct Preference Optimization (Rafailov et al. 2023), with label
                     smoothing (conservative DPO) or the IPO loss (Azar et al. 2023)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response tokens (B, T) and the response mask in prediction space
    (B, T-1): position j is True when it predicts a response token."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    x = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # pragma: no mutate (int64 either way)
    mask = torch.zeros((len(prompts), width - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        x[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = True
    return x.to(device), mask.to(device)  # pragma: no mutate (device: the same without a GPU)


def token_logprobs(model, x: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_T(x[j+1] | x[:j+1]) and the entropy of each prediction, both (B, T-1), where
    p_T = softmax(logits / temperature) is the distribution the tokens were sampled from: the
    ratio, the KL and the entropy must all refer to it."""
    logits = model(x)[0][:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, x[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def rewards_of(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Reward of each sequence: the scalar head at its last token (the readout token)."""
    from tasks.lib.model import padded_batch

    dev = next(model.parameters()).device  # pragma: no mutate (device: the same without a GPU)
    x, valid = padded_batch(seqs, pad_id, left=False, device=dev)  # pragma: no mutate
    values = model(x)  # right padding + causal attention: padding never reaches real tokens
    last = valid.sum(1) - 1
    return values.gather(1, last[:, None]).squeeze(1).float()  # fp32 even under bf16 autocast


def masked_mean(v: torch.Tensor, m: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of v over the positions where m is 1; `count`: divide by this many positions
    instead (a batch split over processes: each divides its part by the whole batch's count,
    and the parts add up to the batch's mean)."""
    return (v * m).sum() / (m.sum().clamp(min=1) if count is None else count)


def whiten(v: torch.Tensor, m: torch.Tensor, total=lambda t: t) -> torch.Tensor:
    """v over the positions where m is 1, shifted to mean 0 and scaled to variance 1. `total`:
    how a sum becomes the whole batch's (Runtime.all_sum when the batch is split over processes)."""
    count = total(m.sum()).clamp(min=1)
    mean = total((v * m).sum()) / count
    var = total(((v - mean) ** 2 * m).sum()) / count
    return (v - mean) * torch.rsqrt(var + 1e-8) * m  # pragma: no mutate (1e-8 only guards a zero variance)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): True at the last True of each row of `mask`."""
    return (mask.long().cumsum(1) == mask.sum(1, keepdim=True)) & mask


def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of InstructGPT's objective and the per-token KL estimate:
    r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the sequence's score at its last token."""
    m = mask.float()
    kl = (logp - ref_logp) * m
    rewards = -beta * kl + last_positions(mask).float() * scores[:, None]
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over the response positions of each row:
    A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with V and A
    zero after the last response position (whatever `values` holds there)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)  # pragma: no mutate (device)
    T = rewards.shape[1]
    m = mask.float()
    for j in reversed(range(T)):
        nxt_m = m[:, j + 1] if j + 1 < T else torch.zeros_like(last)
        nxt_v = values[:, j + 1] * nxt_m if j + 1 < T else torch.zeros_like(last)
        delta = rewards[:, j] + gamma * nxt_v - values[:, j]
        last = delta + gamma * lam * last * nxt_m
        adv[:, j] = last * m[:, j]
    return adv


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
                count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate as a loss: mean over response tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); and the ratio. (`count`: masked_mean's.)"""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(pg, mask, count), ratio


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - mean((returns - values)^2) / Var(returns) over the masked positions: 1 when the
    value function predicts the returns, 0 when it does no better than their mean."""
    resid = masked_mean((returns - values) ** 2, mask)
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    return float(1 - resid / var.clamp(min=1e-8))


def value_loss(v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within `clip` of the old value."""
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((v - returns) ** 2, (v_clipped - returns) ** 2), mask, count)


class KLController:
    """Fixed beta, or adaptive (Ziegler et al. 2019): after each batch of n samples,
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, so that the measured KL
    tracks the target; over `horizon` samples at a constant error of 20% beta moves by e^0.2."""

    def __init__(self, beta: float, adaptive: bool, target: float, horizon: int):
        self.beta, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.beta *= 1 + error * n_steps / self.horizon


GROUP_STD_EPS = 1e-4  # GRPO: a group whose rewards are (nearly) all equal gets advantages of (nearly) 0


def group_advantages(rewards: torch.Tensor, group: int, kind: str) -> torch.Tensor:
    """Advantages of B = P x K sequence rewards laid out prompt by prompt (the K samples of a
    prompt are neighbours). rloo: r_i minus the mean of the other K - 1 rewards of its prompt
    (Ahmadian et al. 2024); grpo: (r_i - mean of the K) / (their standard deviation + eps)
    (Shao et al. 2024, the unbiased standard deviation, as TRL). Needs K >= 2."""
    if group < 2 or rewards.numel() % group:
        raise ValueError(f"group advantages need groups of K >= 2 samples (K = {group}, {rewards.numel()} rewards)")
    r = rewards.reshape(-1, group)
    if kind == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group - 1)
    elif kind == "grpo":
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + GROUP_STD_EPS)
    else:
        raise ValueError(f"unknown group advantage {kind!r} (rloo or grpo)")
    return adv.reshape(-1)


def sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
                      length_normalise: bool = False) -> torch.Tensor:
    """(B,) log p(completion | prompt) summed over the completion's tokens, or their mean
    (Tulu 3's length-normalised DPO)."""
    x, mask = sequences(prompts, completions, pad_id, device)
    logp, _ = token_logprobs(model, x)
    m = mask.float()
    total = (logp * m).sum(1)
    return total / m.sum(1).clamp(min=1) if length_normalise else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0, ipo: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, margins h) over pairs, where h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) -
    log ref(y_l)). DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps = label
    smoothing; 0 is the original loss). IPO: (h - 1 / (2 beta))^2."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), h
