"""ppo: RLHF of the SFT policy against the reward model with PPO (InstructGPT); registered as
`rlhf` (tag `method: ppo`).

    python -m tasks.ppo                 # what `dvc repro ppo` runs

Policy and frozen reference from SFT; value function initialised from the reward model; the
reward of a completion is the reward model's score at `<|reward|>` (normalised inside the
model, so the value function starts in the same units), minus `missing_eos_penalty` when the
response never ends its turn, minus `beta * KL(policy || reference)` per token; GAE with
whitened advantages, clipped surrogate and value losses, PPO-ptx, adaptive beta. The loop is
tasks/lib/rl_loop.py (shared with the critic-free group_rl stage), the stage's frame
tasks/lib/rl_run.py.

Metrics every iteration: reward (and the gold judge's score), KL to the reference, beta,
entropy, clip fraction, approx KL, value loss, explained variance, response length.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.config import Params

STAGE = "ppo"
PARAMS = ("seed", "instructions", "judge", "ppo")
INPUTS = ("sft", "reward", "tokens")
OUTPUTS = ("ppo", "checkpoints", "report")


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    from tasks.lib.rl_run import run_rl

    return run_rl(STAGE, params.ppo, seed=params.seed, instructions_cfg=params.instructions, judge_cfg=params.judge, inputs=inputs,
                  out_dir=outputs["ppo"], checkpoints=outputs["checkpoints"], report_dir=outputs["report"], algorithm="ppo")


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
