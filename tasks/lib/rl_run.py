"""What the RL stages (ppo, group_rl) share around the one loop: their models, prompts, score
function, pretraining batches, the run of tasks/lib/rl_loop.py, and what they write and
register. A stage passes its own section of params.yaml (`cfg`) and its algorithm.

1. models     policy and frozen reference from SFT; for ppo the value function from the
              reward model (in its normalised units); the reward model as the scorer
2. prompts    the `ppo` split of the instruction data (the RL prompt set, as InstructGPT's),
              those that fit `max_prompt_tokens`
3. loop       rl_loop with a score function that also records the gold judge's score of
              every response (a figure PPO never optimises), PPO-ptx batches from the
              pretraining tokens when `ptx_coef` > 0, metrics per iteration to MLflow
4. write      the policy (registered as `rlhf` with a `method` tag), iterations.json, and
              start-vs-end metrics, with the update's health over the second half (median
              clip fraction, final explained variance for ppo)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_dir, write_json

REGISTERED = "rlhf"  # every aligned model, whatever the method (tag `method`)


def run_rl(stage: str, cfg: Any, *, seed: int, instructions_cfg: Any, judge_cfg: Any, inputs: dict[str, Path], out_dir: Path,
           checkpoints: Path, report_dir: Path, algorithm: str, group_size: int = 1) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    import mlflow

    from tasks.lib import instructions, registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.deps import code_hash
    from tasks.lib.hashing import content_hash
    from tasks.lib.judge import Judge
    from tasks.lib.model import load_checkpoint, save_checkpoint
    from tasks.lib.rl import rewards_of
    from tasks.lib.rl_loop import rl_loop
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template
    from tasks.lib.tokens import token_files, windows
    from tasks.lib.train import Reporter, check_finite, fingerprint, seeded

    rt = Runtime(cfg.compute)
    # 1. models
    torch.manual_seed(seed)
    policy, _ = load_checkpoint(inputs["sft"], rt.device)
    ref, _ = load_checkpoint(inputs["sft"], rt.device)
    value = load_checkpoint(inputs["reward"], rt.device)[0] if algorithm == "ppo" else None
    scorer, _ = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    t = Template(load_tokenizer(inputs["sft"]))
    # 2. prompts
    splits = instructions.splits(instructions_cfg, seed)
    judge = Judge([(ex["messages"][0]["content"], ex["messages"][1]["content"]) for split in splits.values() for ex in split],
                  judge_cfg.repetition_penalty, judge_cfg.unfinished_penalty, judge_cfg.contrast_references)
    examples = [ex for ex in splits["ppo"] if len(t.prompt(ex["messages"][0]["content"])) <= instructions_cfg.max_prompt_tokens]
    if len(examples) < cfg.batch_prompts:
        raise StageError(f"only {len(examples)} usable prompts in the 'ppo' split, fewer than {stage}.batch_prompts={cfg.batch_prompts}")
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
        ptx_fn = lambda k: windows(train_tokens, cfg.ptx_batch, policy.cfg.max_seq_len - 1, seeded(seed, k))  # noqa: E731

    # 3. the loop
    total_iters = getattr(cfg, "value_warmup", 0) + cfg.steps  # ppo's value warm-up comes first
    report = Reporter(stage, total_iters, rt.main, every_s=5.0)
    samples: list[str] = []
    logged: set[int] = set()

    def on_iter(it: int, row: dict, responses: list[list[int]], idx: list[int]) -> None:
        # (every process scored as many responses: the mean of their means is the batch's)
        row["gold_score"] = float(rt.all_mean(float(np.mean(gold)))) if gold else float("nan")
        row["sqrt_kl"] = float(np.sqrt(max(row["kl"], 0.0)))  # Gao et al.: gold and RM score against sqrt(KL)
        report.log(it, {k: v for k, v in row.items() if k != "iteration"})
        logged.add(it)
        if it % 10 == 0 or it + 1 == total_iters:
            samples.append(f"### iteration {it + 1}: {examples[idx[0]]['messages'][0]['content']}\n{t.decode(responses[0])}")

    fp = fingerprint([seed, algorithm, group_size, cfg.model_dump(exclude={"compute"}), instructions_cfg.model_dump(), judge_cfg.model_dump()],
                     code_hash(f"tasks.{stage}"), content_hash([inputs["sft"], inputs["reward"]] + ([inputs["tokens"]] if cfg.ptx_coef > 0 else [])))
    hist = rl_loop(policy, ref, value, score_fn, prompts, cfg, pad_id=t.pad, stop_ids=t.stop_ids, seed=seed, device=rt.device,
                   algorithm=algorithm, group_size=group_size, resume_dir=checkpoints, fingerprint=fp, ptx_fn=ptx_fn, on_iter=on_iter,
                   autocast=rt.autocast, compile_decode=rt.compiled, rt=rt)
    if not rt.main:  # the other processes of a run on several sampled and trained only
        return {}
    report.replay([r for r in hist if r["iteration"] - 1 not in logged], key="iteration")  # iterations before a resume
    check_finite(policy, stage)
    # 4. write
    if mlflow.active_run() and samples:
        mlflow.log_text("\n\n".join(samples), f"samples/{stage}.md")
    with atomic_dir(out_dir) as out:
        save_checkpoint(out, policy, inputs["sft"], {"stage": stage, "method": algorithm, "chat": True})
    with atomic_dir(report_dir) as rep:
        write_json(rep / "iterations.json", hist)
    moving = [r for r in hist if r.get("phase") != "value_warmup"]  # the iterations that update the policy
    k = max(len(moving) // 5, 1)  # start vs end: means over the first and last fifth of them
    first, last = moving[:k], moving[-k:]
    mean_of = lambda rows, key: float(np.nanmean([r.get(key, float("nan")) for r in rows]))  # noqa: E731
    tracking.set_tags({**rt.describe(), "method": algorithm})
    import json

    labeler = json.loads((Path(inputs["reward"]) / "config.json").read_text()).get("labeler", "unknown")  # who ranked the RM's data
    tags = {**tracking.git_commit(), **tracking.input_hashes(inputs), "stage": stage, "method": algorithm, "labeler": labeler,
            **registry.parent_tags("sft", inputs["sft"])}
    reward_version = registry.version_of("reward", inputs["reward"])
    tags["reward_model"] = f"reward/{reward_version}" if reward_version else f"sha256:{registry.checkpoint_sha(inputs['reward'])}"
    metrics: dict[str, Any] = {f"{key}_{when}": mean_of(rows, key) for key in ("reward_mean", "kl", "gold_score", "entropy", "response_length")
                               for when, rows in (("start", first), ("end", last))}
    card = registry.model_card(f"{REGISTERED} (method {algorithm})", stage, {k.removeprefix("input."): v for k, v in tracking.input_hashes(inputs).items()},
                               {"iterations": cfg.steps, "lr": cfg.lr, "kl_beta": cfg.kl.beta, "ptx_coef": cfg.ptx_coef, "reward_model": tags["reward_model"]},
                               {k: metrics[k] for k in ("reward_mean_end", "kl_end", "gold_score_end")}, labeler)
    tracking.set_tags({"registered_version": f"{REGISTERED}/{registry.register_checkpoint(REGISTERED, out_dir, tags, card)}"})
    second_half = moving[len(moving) // 2 :]
    metrics.update(method=algorithm, final_beta=hist[-1]["beta"] if hist else cfg.kl.beta, iterations=cfg.steps, prompts=len(prompts),
                   coverage=instructions.coverage(examples), kl_target=cfg.kl.target if cfg.kl.adaptive else None,
                   clip_fraction_median_second_half=float(np.median([r["clip_fraction"] for r in second_half])) if second_half else None)
    if algorithm == "ppo" and hist:
        metrics["explained_variance_end"] = mean_of(last, "explained_variance")
        metrics["explained_variance_start"] = mean_of(hist[:k], "explained_variance")  # before any warm-up
        metrics["explained_variance_policy_start"] = mean_of(first, "explained_variance")  # when the policy starts to move
        metrics["value_warmup"] = cfg.value_warmup
    return metrics
