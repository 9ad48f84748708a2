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
5. report     reports/eval.json (DVC metrics), reports/eval.md (side by side, with samples),
              PNG plots (training curves, reward vs KL in PPO, score distributions)
6. registry   evaluation metrics as tags on each model version; the candidate (newest
              version of `evaluate.promotion.model`) takes the `champion` alias only when it
              beats the current champion, re-measured on the same prompts, by `min_margin`;
              otherwise it becomes `challenger`. The decision and its reason are logged.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.config import Params
from tasks.storage import StageError, atomic_dir, atomic_file

STAGE = "evaluate"
REPORT = "eval"  # reports/eval.json, reports/eval.md, reports/eval_plots/
PARAMS = ("seed", "instructions", "preferences", "evaluate")
INPUTS = ("base", "sft", "rlhf", "reward", "tokens")
OUTPUTS: tuple[str, ...] = ()
MODELS = ("base", "sft", "rlhf")


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
    """Whether the candidate takes the champion alias, and why."""
    if champion is None:
        return True, f"no champion yet: candidate ({candidate:.4f}) becomes champion"
    if candidate >= champion + min_margin:
        return True, f"candidate {candidate:.4f} >= champion {champion:.4f} + margin {min_margin}"
    return False, f"candidate {candidate:.4f} < champion {champion:.4f} + margin {min_margin}: candidate becomes challenger"


# ---------------------------------------------------------------------------- generation
class Evaluator:
    """Generates and scores completions of the evaluation prompts for any chat or base model."""

    def __init__(self, params: Params, template, scorer, rm_stats: dict, examples: list[dict], shots: list[dict], autocast):
        self.p, self.t, self.scorer, self.rm_stats, self.examples = params.evaluate, template, scorer, rm_stats, examples
        self.autocast = autocast
        self.pp = params.preferences
        self.seed = params.seed
        prefix = "".join(f"Q: {ex['messages'][0]['content']}\nA: {ex['messages'][1]['content']}\n\n" for ex in shots)
        self.doc_prefix = [template.eot, *template.text_ids(prefix)]

    def prompt_ids(self, question: str, chat: bool) -> list[int]:
        return self.t.prompt(question) if chat else self.doc_prefix + self.t.text_ids(f"Q: {question}\nA:")

    def run(self, model, chat: bool) -> dict[str, Any]:
        from tasks.judge import gold_score
        from tasks.model import generate
        from tasks.ppo import sequences, token_logprobs
        from tasks.reward import rewards_of

        t, k = self.t, self.p.samples_per_prompt
        prompts = [self.prompt_ids(ex["messages"][0]["content"], chat) for ex in self.examples]
        limit = model.cfg.max_seq_len - self.p.max_new_tokens
        prompts = [p[-limit:] for p in prompts]
        rows = [p for p in prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(self.seed)
        with self.autocast:
            outs = generate(model, rows, self.p.max_new_tokens, pad_id=t.pad, stop_ids=(t.end_turn, t.eot),
                            temperature=self.p.temperature, top_p=self.p.top_p, generator=gen)
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
        with torch.no_grad(), self.autocast:
            x, mask = sequences(rows, [o if o else [t.pad] for o in outs], t.pad, next(model.parameters()).device)
            _, ent = token_logprobs(model, x)
            entropy = float((ent * mask).sum() / mask.sum().clamp(min=1))
            chat_prompts = [t.prompt(ex["messages"][0]["content"]) for ex in self.examples for _ in range(k)]
            rm = ((rewards_of(self.scorer, [t.scored(p, c) for p, c in zip(chat_prompts, comp_ids)], t.pad)
                   - self.rm_stats["reward_mean"]) / self.rm_stats["reward_std"]).tolist()
        refs = [ex["messages"][1]["content"] for ex in self.examples for _ in range(k)]
        gold = [gold_score(c, r, f, self.pp.repetition_penalty, self.pp.unfinished_penalty) for c, r, f in zip(texts, refs, finished)]
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
    from tasks.pretrain import token_files, windows
    from tasks.train import seeded

    _, val, _ = token_files(tokens_dir)
    T = min(model.cfg.max_seq_len, len(val) - 2)
    dev = next(model.parameters()).device
    losses = [float(model(*(w.to(dev) for w in windows(val, 8, T, seeded(seed, -1, i))))[1]) for i in range(batches)]
    return float(math.exp(np.mean(losses)))


@torch.no_grad()
def sft_val_loss(model, template, examples: list[dict], params: Params) -> float:
    from tasks.sft import encode_examples, masked_batch

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
def plots(folder: Path, experiment: str, outs: dict[str, dict]) -> list[str]:
    """Training curves of every stage, reward vs KL in PPO, score distributions per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    folder.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)

    def history(stage: str, key: str) -> tuple[list[int], list[float]]:
        if exp is None:
            return [], []
        runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return [], []
        h = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
        return [m.step for m in h], [m.value for m in h]

    made = []
    curves = {"pretrain": ("loss", "val_loss"), "sft": ("loss", "val_loss"), "reward": ("loss", "val_accuracy"), "ppo": ("reward_mean", "kl")}
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (stage, keys) in zip(axes, curves.items()):
        for key in keys:
            xs, ys = history(stage, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "training_curves.png", dpi=80)
    made.append("training_curves.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    _, kl = history("ppo", "kl")
    _, rew = history("ppo", "reward_mean")
    if kl and rew:
        sc = ax.scatter(kl[: len(rew)], rew[: len(kl)], c=range(min(len(kl), len(rew))), cmap="viridis")
        fig.colorbar(sc, label="PPO iteration")
    ax.set_xlabel("KL(policy || SFT) per sequence")
    ax.set_ylabel("reward (normalised)")
    ax.set_title("PPO: reward vs KL")
    fig.tight_layout()
    fig.savefig(folder / "ppo_reward_vs_kl.png", dpi=80)
    made.append("ppo_reward_vs_kl.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, out in outs.items():
        axes[0].hist(out["rm"], bins=20, alpha=0.5, label=name)
        axes[1].hist(out["gold"], bins=20, alpha=0.5, label=name)
    axes[0].set_title("reward-model score")
    axes[1].set_title("gold judge score")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "score_distributions.png", dpi=80)
    made.append("score_distributions.png")
    plt.close(fig)
    return made


def markdown(metrics: dict, examples: list[dict], outs: dict[str, dict], k: int, n_samples: int, figures: list[str]) -> str:
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
    p = metrics["promotion"]
    lines += ["", f"**Promotion** ({p['model']}, metric `{p['metric']}`): {p['decision']} — {p['reason']}", ""]
    lines += [f"![{f}](eval_plots/{f})" for f in figures] + ["", "## Samples", ""]
    for i, ex in enumerate(examples[:n_samples]):
        lines += [f"### {ex['messages'][0]['content']}", "", f"*reference:* {ex['messages'][1]['content']}", ""]
        for m in MODELS:
            lines.append(f"- **{m}:** {outs[m]['texts'][i * k] or '(empty)'}")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the stage
def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    import mlflow

    from tasks import instructions, registry
    from tasks.chat import Template
    from tasks.model import load_checkpoint
    from tasks.tokenizer import load_tokenizer
    from tasks.train import Runtime

    cfg = params.evaluate
    t = Template(load_tokenizer(inputs["sft"]))
    splits = instructions.splits(params.instructions, params.seed)
    # 1. prompts
    examples = [ex for ex in splits["eval"] if len(t.prompt(ex["messages"][0]["content"])) <= params.instructions.max_prompt_tokens][: cfg.prompts]
    if len(examples) < 2:
        raise StageError("fewer than 2 usable prompts in the 'eval' split: widen instructions.split.eval")
    rt = Runtime(cfg)
    scorer, rm_info = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    ev = Evaluator(params, t, scorer, rm_info, examples, splits["sft"][: cfg.few_shot], rt.autocast)
    models = {name: load_checkpoint(inputs[name], rt.device)[0].eval() for name in MODELS}
    # 2-3. generate and score
    outs = {name: ev.run(models[name], chat=name != "base") for name in MODELS}
    # 4. metrics
    metrics: dict[str, Any] = {"models": {}, "prompts": len(examples), "samples_per_prompt": cfg.samples_per_prompt}
    for name in MODELS:
        m = ev.summary(outs[name], outs["sft"] if name != "sft" else None)
        with rt.autocast:
            m["val_perplexity"] = val_perplexity(models[name], inputs["tokens"], cfg.val_batches, params.seed)
            m["sft_val_loss"] = sft_val_loss(models[name], t, splits["sft_val"], params)
        metrics["models"][name] = m
    # 6. registry: tags and the promotion decision (5. report follows, so it can state it)
    pr = cfg.promotion
    versions = {name: registry.version_of(name, inputs[name]) for name in MODELS}  # the versions this run evaluated
    for name, version in versions.items():
        if version is not None:
            registry.tag_version(name, version, {f"eval.{k}": round(v, 6) for k, v in metrics["models"][name].items()})
    candidate_version = versions[pr.model]
    candidate_value = metrics["models"][pr.model].get(pr.metric)
    champion_version = registry.alias_version(pr.model, "champion")
    champion_value = None
    if champion_version is not None and champion_version != candidate_version:
        champ_model = load_checkpoint(registry.download_checkpoint(f"models:/{pr.model}/{champion_version}"), rt.device)[0].eval()
        champ_out = ev.run(champ_model, chat=True)
        champion_value = ev.summary(champ_out, outs["sft"])[pr.metric]
    if candidate_version is None:
        decision, reason = "none", f"the evaluated {pr.model} checkpoint is not a registered version"
    elif candidate_value is None:
        decision, reason = "none", f"metric {pr.metric} is not measured for {pr.model}"
    elif champion_version == candidate_version:
        decision, reason = "unchanged", f"version {candidate_version} is already the champion"
    else:
        promote, reason = decide(candidate_value, champion_value, pr.min_margin)
        decision = "champion" if promote else "challenger"
        registry.set_alias(pr.model, decision, candidate_version)
    metrics["promotion"] = {"model": pr.model, "metric": pr.metric, "candidate_version": candidate_version, "candidate_value": candidate_value,
                            "champion_version": champion_version, "champion_value": champion_value, "decision": decision, "reason": reason}
    if mlflow.active_run():
        mlflow.set_tags({"promotion.decision": decision, "promotion.reason": reason[:250]})
    # 5. report
    reports = Path(params.paths.reports)
    with atomic_dir(reports / f"{REPORT}_plots") as folder:
        figures = plots(folder, params.mlflow.experiment, outs)
    with atomic_file(reports / f"{REPORT}.md") as fh:
        fh.write(markdown(metrics, examples, outs, cfg.samples_per_prompt, cfg.samples_in_report, figures))
    samples = [{"prompt": ex["messages"][0]["content"], **{m: outs[m]["texts"][i * cfg.samples_per_prompt] for m in MODELS}} for i, ex in enumerate(examples)]
    with atomic_file(reports / f"{REPORT}_samples.json") as fh:
        json.dump(samples, fh, indent=1, ensure_ascii=False)
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS, report=REPORT))
