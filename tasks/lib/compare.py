"""Paired comparisons of two models (or a model and a baseline) on the same prompts.

Each prompt has K_a scores of model A and K_b of model B (all samples of both; a baseline
such as a constant answer has one). Per prompt:

    win_i   = share of the K_a x K_b sample pairs where A scores higher (ties count half)
    diff_i  = mean of A's scores - mean of B's scores

The comparison is the mean over prompts of each, with a paired bootstrap interval: prompts
are resampled with replacement (the prompt is the unit, so samples of one prompt stay
together), `resamples` times from a seeded generator, and the 2.5th and 97.5th percentiles of
the resampled means are the 95% interval (percentile bootstrap, Efron & Tibshirani).

    compare(scores_a, scores_b, seed=0)   # scores_x: (prompts, K_x) arrays
    -> {"win_rate", "win_ci_low", "win_ci_high", "diff", "diff_ci_low", "diff_ci_high", "prompts"}

`worst_case_half_width(n)` is the widest a 95% interval of a mean of n per-prompt values in
[0, 1] can be (normal approximation at variance 1/4): what the evaluation checks before it
starts, so that a split too small for the interval asked fails at once.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def per_prompt_wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(prompts,) share of sample pairs of each prompt that A wins, ties counting half."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] == 0:
        raise ValueError(f"paired scores need (prompts, samples) arrays with the same prompts, got {a.shape} and {b.shape}")
    gt = (a[:, :, None] > b[:, None, :]).mean((1, 2))
    eq = (a[:, :, None] == b[:, None, :]).mean((1, 2))
    return gt + 0.5 * eq


def bootstrap_interval(values: np.ndarray, seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (one value per prompt)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(a: np.ndarray, b: np.ndarray, seed: int, resamples: int = 2000) -> dict[str, float]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    wins = per_prompt_wins(a, b)
    diffs = a.mean(1) - b.mean(1)
    wl, wh = bootstrap_interval(wins, seed, resamples)
    dl, dh = bootstrap_interval(diffs, seed + 1, resamples)
    return {"win_rate": float(wins.mean()), "win_ci_low": wl, "win_ci_high": wh,
            "diff": float(diffs.mean()), "diff_ci_low": dl, "diff_ci_high": dh, "prompts": int(len(wins))}


def worst_case_half_width(n: int) -> float:
    return Z95 * 0.5 / math.sqrt(n)


def prompts_for_half_width(half_width: float) -> int:
    """The fewest prompts whose worst-case 95% interval is no wider than +- half_width."""
    return math.ceil((Z95 * 0.5 / half_width) ** 2)
