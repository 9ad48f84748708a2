"""evaluate: compare base, SFT and RLHF on held-out prompts; promote a champion.

    python -m tasks.evaluate            # what `dvc repro evaluate` runs

1. prompts    the `eval` split of the instruction data, which no training stage saw
2. generate   `samples_per_prompt` samples per prompt and model, fixed seed and sampling
              settings; the base model is prompted as a document to complete, with a
              few-shot prefix of question/answer pairs ("State of GPT")
3. score      reward-model score (normalised), the gold judge's score
4. metrics    validation perplexity on the pretraining validation tokens, SFT validation
              loss, win rate against SFT (by the reward model and by the gold judge, with a
              95% Wilson interval), distinct-1/2, mean token entropy, self-similarity across
              samples of one prompt, response length, share of completions that end the turn
5. report     reports/evaluate.json (DVC metrics), reports/evaluate/: report.md (side by
              side, with samples), samples.json, scores_<model>.json (DVC plots) and a PNG
              of the score distributions. These depend only on the models and the data.
6. registry   evaluation metrics as tags on each model version; the candidate (the evaluated
              version of `evaluate.promotion.model`) takes the `champion` alias only when it
              beats the current champion, re-measured on the same prompts, by more than
              `min_margin`; otherwise it becomes `challenger`. The decision depends on the
              registry, not only on the files, so it is recorded in MLflow (run tags and
              promotion.json) and in the stage's log, not in the DVC outputs.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.storage import atomic_dir, atomic_file, progress, write_json

STAGE = "evaluate"
PARAMS = ("seed", "instructions", "judge", "evaluate")
INPUTS = ("base", "sft", "rlhf", "reward", "tokens")
OUTPUTS = ("report",)
MODELS = ("base", "sft", "rlhf")

log = logging.getLogger(STAGE)


# ---------------------------------------------------------------------------- metrics
def distinct_n(token_lists: list[list[int]], n: int) -> float:
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(a: list[float], b: list[float]) -> dict[str, float]:
    """Share of prompts where a beats b (ties count half), with a 95% Wilson interval."""
    if len(a) != len(b) or not a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    n, z = len(a), 1.96
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": p, "ci_low": max(0.0, centre - half), "ci_high": min(1.0, centre + half), "n": n}


def self_similarity(samples: list[list[str]]) -> float:
    """Mean Jaccard similarity of the word sets of samples drawn for the same prompt."""
    sims = []
    for group in samples:
        sets = [set(re.findall(r"\w+", s.lower())) for s in group]
        for x, y in itertools.combinations(sets, 2):
            sims.append(len(x & y) / len(x | y) if x | y else 1.0)
    return float(np.mean(sims)) if sims else 0.0


def decide(candidate: float, champion: float | None, min_margin: float) -> tuple[bool, str]:
    """Whether the candidate takes the champion alias, and why: only a strict win by more
    than the margin promotes (a tie keeps the champion)."""
    if champion is None:
        return True, f"no champion yet: candidate ({candidate:.4f}) becomes champion"
    if candidate > champion + min_margin:
        return True, f"candidate {candidate:.4f} > champion {champion:.4f} + margin {min_margin}"
    return False, f"candidate {candidate:.4f} <= champion {champion:.4f} + margin {min_margin}: candidate becomes challenger"


# ---------------------------------------------------------------------------- generation
class Evaluator:
    """Generates and scores completions of the evaluation prompts for any chat or base model."""

    def __init__(self, params: Params, template, scorer, examples: list[dict], shots: list[dict], autocast):
        self.p, self.t, self.scorer, self.examples = params.evaluate, template, scorer, examples
        self.autocast = autocast
        self.judge = params.judge
        self.seed = params.seed
        prefix = "".join(f"Q: {ex['messages'][0]['content']}\nA: {ex['messages'][1]['content']}\n\n" for ex in shots)
        self.doc_prefix = [template.eot, *template.text_ids(prefix)]

    def prompt_ids(self, question: str, chat: bool) -> list[int]:
        return self.t.prompt(question) if chat else self.doc_prefix + self.t.text_ids(f"Q: {question}\nA:")

    def run(self, model, chat: bool, name: str = "model", batch: int = 32) -> dict[str, Any]:
        from tasks.lib.judge import gold_score
        from tasks.lib.model import generate
        from tasks.lib.rl import rewards_of, sequences, token_logprobs

        t, k, sp = self.t, self.p.samples_per_prompt, self.p.sampling
        prompts = [self.prompt_ids(ex["messages"][0]["content"], chat) for ex in self.examples]
        limit = model.cfg.max_seq_len - sp.max_new_tokens
        prompts = [p[-limit:] for p in prompts]
        rows = [p for p in prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(self.seed)
        outs: list[list[int]] = []
        for i in progress(range(0, len(rows), batch), total=(len(rows) + batch - 1) // batch, desc=f"evaluate {name}", unit="batch"):
            with self.autocast:
                outs += generate(model, rows[i : i + batch], sp.max_new_tokens, pad_id=t.pad, stop_ids=t.stop_ids,
                                 temperature=sp.temperature, top_p=sp.top_p, generator=gen)
        texts, finished, comp_ids = [], [], []
        for o in outs:
            text = t.decode(o)
            if chat:
                done = bool(o) and o[-1] == t.end_turn
            else:  # a document-style answer ends at the blank line before the next question
                done = "\n\n" in text or (bool(o) and o[-1] == t.eot)
                text = text.split("\n\n")[0]
            texts.append(text.strip())
            finished.append(done)
            comp_ids.append(t.text_ids(text.strip()) + ([t.end_turn] if done else []))
        max_len = self.scorer.cfg.max_seq_len
        with torch.no_grad(), self.autocast:
            x, mask = sequences(rows, [o if o else [t.pad] for o in outs], t.pad, next(model.parameters()).device)
            _, ent = token_logprobs(model, x)
            entropy = float((ent * mask).sum() / mask.sum().clamp(min=1))
            chat_prompts = [t.prompt(ex["messages"][0]["content"]) for ex in self.examples for _ in range(k)]
            # the reward model's output is normalised inside it (mean 0, std 1 on its training completions)
            rm = rewards_of(self.scorer, [t.scored(p, c, max_len) for p, c in zip(chat_prompts, comp_ids)], t.pad).tolist()
        refs = [ex["messages"][1]["content"] for ex in self.examples for _ in range(k)]
        gold = [gold_score(c, r, f, self.judge.repetition_penalty, self.judge.unfinished_penalty) for c, r, f in zip(texts, refs, finished)]
        return {"texts": texts, "finished": finished, "comp_ids": comp_ids, "rm": rm, "gold": gold, "entropy": entropy}

    def summary(self, out: dict, reference: dict | None) -> dict[str, float]:
        k = self.p.samples_per_prompt
        first = lambda xs: xs[::k]  # noqa: E731 - sample 0 of each prompt is the one compared
        m = {
            "rm_score": float(np.mean(out["rm"])),
            "gold_score": float(np.mean(out["gold"])),
            "distinct_1": distinct_n(out["comp_ids"], 1),
            "distinct_2": distinct_n(out["comp_ids"], 2),
            "mean_token_entropy": out["entropy"],
            "self_similarity": self_similarity([out["texts"][i : i + k] for i in range(0, len(out["texts"]), k)]),
            "response_length": float(np.mean([len(c) for c in out["comp_ids"]])),
            "finished_share": float(np.mean(out["finished"])),
        }
        if reference is not None:
            for key, name in (("rm", "rm"), ("gold", "gold")):
                w = win_rate(first(out[key]), first(reference[key]))
                m[f"win_rate_vs_sft_{name}"] = w["rate"]
                m[f"win_rate_vs_sft_{name}_ci_low"] = w["ci_low"]
                m[f"win_rate_vs_sft_{name}_ci_high"] = w["ci_high"]
        return m


# ---------------------------------------------------------------------------- losses
@torch.no_grad()
def val_perplexity(model, tokens_dir: Path, batches: int, seed: int) -> float:
    from tasks.lib.tokens import token_files, windows
    from tasks.lib.train import seeded

    _, val, _ = token_files(tokens_dir)
    T = min(model.cfg.max_seq_len, len(val) - 2)
    dev = next(model.parameters()).device
    losses = [float(model(*(w.to(dev) for w in windows(val, 8, T, seeded(seed, -1, i))))[1]) for i in range(batches)]
    return float(math.exp(np.mean(losses)))


@torch.no_grad()
def sft_val_loss(model, template, examples: list[dict], params: Params) -> float:
    from tasks.lib.instructions import encode_examples, masked_batch

    ic = params.instructions
    items, _ = encode_examples(examples, template, ic.max_prompt_tokens, ic.max_response_tokens, model.cfg.max_seq_len)
    total = count = 0.0
    for i in range(0, len(items), 16):
        x, y, m = (v.to(next(model.parameters()).device) for v in masked_batch(items[i : i + 16], template.pad))
        n = float(m.sum())
        total += float(model(x, y, loss_mask=m)[1]) * n
        count += n
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------- report
def score_plot(path: Path, outs: dict[str, dict]) -> None:  # pragma: no mutate block (a picture: checked end to end)
    """Histograms of the reward-model and gold scores per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, out in outs.items():
        axes[0].hist(out["rm"], bins=20, alpha=0.5, label=name)
        axes[1].hist(out["gold"], bins=20, alpha=0.5, label=name)
    axes[0].set_title("reward-model score (normalised)")
    axes[1].set_title("gold judge score")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def markdown(metrics: dict, examples: list[dict], outs: dict[str, dict], k: int, n_samples: int) -> str:  # pragma: no mutate block (report layout)
    keys = ["val_perplexity", "sft_val_loss", "rm_score", "gold_score", "win_rate_vs_sft_rm", "win_rate_vs_sft_gold",
            "distinct_1", "distinct_2", "mean_token_entropy", "self_similarity", "response_length", "finished_share"]
    lines = ["# Evaluation: base vs SFT vs RLHF", "", f"{len(examples)} held-out prompts, {k} samples each.", "",
             "| metric | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for key in keys:
        cells = []
        for m in MODELS:
            v = metrics["models"][m].get(key)
            if v is None:
                cells.append("–")
            elif key.startswith("win_rate"):
                cells.append(f"{v:.3f} [{metrics['models'][m][key + '_ci_low']:.2f}, {metrics['models'][m][key + '_ci_high']:.2f}]")
            else:
                cells.append(f"{v:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "![score distributions](score_distributions.png)", "", "## Samples", ""]
    for i, ex in enumerate(examples[:n_samples]):
        lines += [f"### {ex['messages'][0]['content']}", "", f"*reference:* {ex['messages'][1]['content']}", ""]
        for m in MODELS:
            lines.append(f"- **{m}:** {outs[m]['texts'][i * k] or '(empty)'}")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- promotion
RM_METRICS = ("win_rate_vs_sft_rm", "rm_score")


def promote(pr, versions: dict[str, str | None], metrics: dict, measure_champion) -> dict[str, Any]:
    """Tag the evaluated versions, then move `champion` or set `challenger` (step 6).
    `pr`: the promotion settings; `versions`: the registered version of each evaluated
    model; `measure_champion(version) -> float`: the metric of the current champion,
    re-measured on this run's prompts."""
    from tasks.lib import registry

    for name, version in versions.items():
        if version is not None:
            registry.tag_version(name, version, {f"eval.{k}": round(v, 6) for k, v in metrics["models"][name].items()})
    candidate_version = versions[pr.model]
    candidate_value = metrics["models"][pr.model].get(pr.metric)
    champion_version = registry.alias_version(pr.model, "champion")
    champion_value = None
    if candidate_version is None:
        decision, reason = "none", f"the evaluated {pr.model} checkpoint is not a registered version"
    elif candidate_value is None:
        decision, reason = "none", f"metric {pr.metric} is not measured for {pr.model}"
    elif champion_version == candidate_version:
        decision, reason = "unchanged", f"version {candidate_version} is already the champion"
    else:
        if champion_version is not None:
            champion_value = measure_champion(champion_version)
        ok, reason = decide(candidate_value, champion_value, pr.min_margin)
        decision = "champion" if ok else "challenger"
        registry.set_alias(pr.model, decision, candidate_version)
    judged_by = ("the reward model that PPO optimised (it can be exploited: compare the gold judge's win rate)"
                 if pr.metric in RM_METRICS else "the gold judge, independent of the reward model PPO optimised")
    return {"model": pr.model, "metric": pr.metric, "judged_by": judged_by, "candidate_version": candidate_version,
            "candidate_value": candidate_value, "champion_version": champion_version, "champion_value": champion_value,
            "decision": decision, "reason": reason}


def select_prompts(examples: list[dict], template, max_prompt_tokens: int, n: int, seed: int) -> list[dict]:
    """A seeded random sample of the usable held-out prompts (not the head of a sorted list)."""
    from tasks.lib.instructions import sample

    usable = [ex for ex in examples if len(template.prompt(ex["messages"][0]["content"])) <= max_prompt_tokens]
    return sample(usable, n, seed, "evaluate")


# ---------------------------------------------------------------------------- the stage
def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    import mlflow

    from tasks.lib import instructions, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.model import load_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.template import Template

    cfg = params.evaluate
    t = Template(load_tokenizer(inputs["sft"]))
    splits = instructions.splits(params.instructions, params.seed)
    # 1. prompts
    examples = select_prompts(splits["eval"], t, params.instructions.max_prompt_tokens, cfg.prompts, params.seed)
    if len(examples) < 2:
        raise StageError("fewer than 2 usable prompts in the 'eval' split: widen instructions.split.eval")
    rt = Runtime(cfg.compute)
    scorer, _ = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    ev = Evaluator(params, t, scorer, examples, instructions.sample(splits["sft"], cfg.few_shot, params.seed, "few-shot"), rt.autocast)
    models = {name: load_checkpoint(inputs[name], rt.device)[0].eval() for name in MODELS}
    # 2-3. generate and score
    outs = {name: ev.run(models[name], chat=name != "base", name=name) for name in MODELS}
    # 4. metrics
    metrics: dict[str, Any] = {"models": {}, "prompts": len(examples), "samples_per_prompt": cfg.samples_per_prompt,
                               "coverage": instructions.coverage(examples)}
    for name in MODELS:
        m = ev.summary(outs[name], outs["sft"] if name != "sft" else None)
        with rt.autocast:
            m["val_perplexity"] = val_perplexity(models[name], inputs["tokens"], cfg.val_batches, params.seed)
            m["sft_val_loss"] = sft_val_loss(models[name], t, splits["sft_val"], params)
        metrics["models"][name] = m
    # 5. report
    k = cfg.samples_per_prompt
    with atomic_dir(outputs["report"]) as rep:
        score_plot(rep / "score_distributions.png", outs)
        with atomic_file(rep / "report.md") as fh:
            fh.write(markdown(metrics, examples, outs, k, cfg.samples_in_report))
        write_json(rep / "samples.json", [{"prompt": ex["messages"][0]["content"], **{m: outs[m]["texts"][i * k] for m in MODELS}}
                                          for i, ex in enumerate(examples)])
        for name in MODELS:
            write_json(rep / f"scores_{name}.json", [{"sample": i, "rm": r, "gold": g} for i, (r, g) in enumerate(zip(outs[name]["rm"], outs[name]["gold"]))])
    # 6. registry
    from tasks.lib import registry

    pr = cfg.promotion

    def measure_champion(version: str) -> float:
        champ = load_checkpoint(registry.download_checkpoint(f"models:/{pr.model}/{version}"), rt.device)[0].eval()
        return ev.summary(ev.run(champ, chat=True, name="champion"), outs["sft"])[pr.metric]

    decision = promote(pr, {name: registry.version_of(name, inputs[name]) for name in MODELS}, metrics, measure_champion)
    log.info("promotion of %s on %s (%s): %s (%s)", decision["model"], decision["metric"], decision["judged_by"], decision["decision"], decision["reason"])
    if mlflow.active_run():
        tracking.set_tags({"promotion.decision": decision["decision"], "promotion.reason": decision["reason"]})
        mlflow.log_dict(decision, "promotion.json")
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
