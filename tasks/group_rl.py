"""group_rl: critic-free RL of the SFT policy against the reward model, RLOO or GRPO; registered
as `rlhf` (tag `method: rloo` or `grpo`).

    python -m tasks.group_rl            # what `dvc repro group_rl` runs

The same loop as ppo (tasks/lib/rl_loop.py), the same reward model, reward and KL-to-reference
term, but no value network: each prompt is sampled `group_size` (K) times and the group is
its own baseline. RLOO (Ahmadian et al. 2024): a sample's advantage is its total reward
(score - beta * its KL) minus the mean of the other K - 1; GRPO (Shao et al. 2024, as in
DeepSeekMath and nanochat): minus the group's mean, divided by the group's standard
deviation. Every token of a sample shares its advantage; the clipped surrogate, PPO-ptx and
the adaptive beta are PPO's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.config import Params

STAGE = "group_rl"
PARAMS = ("seed", "instructions", "judge", "group_rl")
INPUTS = ("sft", "reward", "tokens")
OUTPUTS = ("group_rl", "checkpoints", "report")


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    from tasks.lib.rl_run import run_rl

    cfg = params.group_rl
    return run_rl(STAGE, cfg, seed=params.seed, instructions_cfg=params.instructions, judge_cfg=params.judge, inputs=inputs,
                  out_dir=outputs["group_rl"], checkpoints=outputs["checkpoints"], report_dir=outputs["report"],
                  algorithm=cfg.algorithm, group_size=cfg.group_size)


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
