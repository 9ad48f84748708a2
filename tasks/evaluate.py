"""evaluate: the verdict. Every model and every trivial answer scored by one validated judge
on every usable held-out prompt, compared with paired intervals; a champion only on a win.

    python -m tasks.evaluate            # what `dvc repro evaluate` runs

1. prompts     every usable prompt of the `eval` split (no training stage saw them); the split
               must be large enough that no 95% interval of a win rate is wider than
               +-`max_ci_half_width` (checked before anything runs); 13-gram overlap with the
               pretraining and SFT data is measured and, with `contamination.action: drop`,
               contaminated prompts are left out
2. generate    `samples_per_prompt` samples per prompt from base, SFT and each aligned model,
               fixed seeds and sampling settings (the base model answers a few-shot document);
               SFT also at each of `sft_temperatures` (0 = greedy)
3. baselines   scored exactly like the models: `constant` (the one answer, among the SFT
               training answers, that scores best over these prompts), `prompt_copy`,
               `reference` (the ceiling), and `sft_best_temperature`
4. score       the gold judge (tasks/lib/judge.py) and the reward model (normalised)
5. compare     paired per prompt over all samples (tasks/lib/compare.py): win rate and score
               difference with 95% bootstrap intervals, against SFT and the baselines
6. language    bits per byte and perplexity on the pretraining validation tokens, SFT
               validation loss, the built-in multiple-choice benchmark (accuracy vs chance)
7. report      reports/evaluate.json (DVC metrics), reports/evaluate/: report.md, samples,
               per-sample scores (DVC plots), baselines.json, a PNG of the score distributions
8. registry    eval.* tags on each version; the candidate takes `champion` only when it beats
               SFT (at the evaluation temperature and at its best), the current champion
               (re-measured on these prompts) with each win rate's interval above 0.5 +
               `min_margin`, and the constant answer (score difference above 0); otherwise it
               becomes `challenger`. The decision and its numbers go to the version's tags, the
               stage's MLflow run (promotion.json), its log and the Prefect report.
"""

from __future__ import annotations

import itertools
import logging
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
INPUTS = ("base", "sft", "ppo", "group_rl", "dpo", "reward", "tokens", "mix", "dedup")
OUTPUTS = ("report",)
ALIGNED = ("ppo", "group_rl", "dpo")  # every aligned method; they compete for the one champion alias of `rlhf`
MODELS = ("base", "sft", *ALIGNED)
BASELINES = ("constant", "prompt_copy", "reference")
COMPARATORS = ("best_of_n", "sft_best_temperature")  # cheap ways to improve on SFT without training

log = logging.getLogger(STAGE)


# ---------------------------------------------------------------------------- metrics
def distinct_n(token_lists: list[list[int]], n: int) -> float:
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_similarity(samples: list[list[str]]) -> float:
    """Mean Jaccard similarity of the word sets of samples drawn for the same prompt."""
    sims = []
    for group in samples:
        sets = [set(re.findall(r"\w+", s.lower())) for s in group]
        for x, y in itertools.combinations(sets, 2):
            sims.append(len(x & y) / len(x | y) if x | y else 1.0)
    return float(np.mean(sims)) if sims else 0.0


def decide(vs: dict[str, dict | None], min_margin: float) -> tuple[bool, str]:
    """Whether the candidate takes the champion alias, and why. `vs`: paired comparisons of
    the candidate (tasks/lib/compare.py) with `sft`, `sft_best_temperature`, `constant` and
    `champion` (None when there is no champion yet). Every check must pass."""
    checks = []
    for name in ("sft", "sft_best_temperature", "champion"):
        c = vs.get(name)
        if c is None:
            continue
        ok = c["win_ci_low"] > 0.5 + min_margin
        checks.append((ok, f"win rate vs {name} {c['win_rate']:.3f} [{c['win_ci_low']:.3f}, {c['win_ci_high']:.3f}] "
                           f"{'>' if ok else '<='} 0.5 + margin {min_margin} at its lower bound"))
    c = vs["constant"]
    ok = c["diff_ci_low"] > 0
    checks.append((ok, f"score - constant answer's {c['diff']:+.4f} [{c['diff_ci_low']:+.4f}, {c['diff_ci_high']:+.4f}] "
                       f"{'>' if ok else '<='} 0 at its lower bound"))
    if vs.get("champion") is None:
        checks.append((True, "no champion yet"))
    passed = all(ok for ok, _ in checks)
    return passed, "; ".join(text for _, text in checks)


# ---------------------------------------------------------------------------- generation
class Evaluator:
    """Generates and scores completions of the evaluation prompts for any chat or base model;
    every result is shaped (prompts, samples)."""

    def __init__(self, params: Params, template, scorer, judge, examples: list[dict], shots: list[dict], autocast,
                 compile_decode: bool = False):
        self.p, self.t, self.scorer, self.judge, self.examples = params.evaluate, template, scorer, judge, examples
        self.autocast, self.compile_decode = autocast, compile_decode  # the decode step under torch.compile (CUDA)
        self.seed = params.seed
        prefix = "".join(f"Q: {ex['messages'][0]['content']}\nA: {ex['messages'][1]['content']}\n\n" for ex in shots)
        self.doc_prefix = [template.eot, *template.text_ids(prefix)]
        self.questions = [ex["messages"][0]["content"] for ex in examples]
        self.references = [ex["messages"][1]["content"] for ex in examples]

    def prompt_ids(self, question: str, chat: bool) -> list[int]:
        return self.t.prompt(question) if chat else self.doc_prefix + self.t.text_ids(f"Q: {question}\nA:")

    def run(self, model, chat: bool, name: str = "model", temperature: float | None = None, samples: int | None = None,
            batch: int = 128) -> dict[str, Any]:
        from tasks.lib.model import generate

        t, sp = self.t, self.p.sampling
        k = samples or self.p.samples_per_prompt
        temp = sp.temperature if temperature is None else temperature
        prompts = [self.prompt_ids(q, chat) for q in self.questions]
        limit = model.cfg.max_seq_len - sp.max_new_tokens
        prompts = [p[-limit:] for p in prompts]
        rows = [p for p in prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(self.seed)
        outs: list[list[int]] = []
        ents: list[float] = []  # the model's entropy (T = 1) at each generated token
        for i in progress(range(0, len(rows), batch), total=(len(rows) + batch - 1) // batch, desc=f"evaluate {name}", unit="batch"):
            with self.autocast:
                outs += generate(model, rows[i : i + batch], sp.max_new_tokens, pad_id=t.pad, stop_ids=t.stop_ids,
                                 temperature=temp, top_p=sp.top_p, generator=gen, entropy=ents, compile=self.compile_decode)
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
        entropy = float(np.mean(ents)) if ents else 0.0
        out = self.score(texts, finished, comp_ids, k)
        return {**out, "texts": texts, "finished": finished, "comp_ids": comp_ids, "entropy": entropy, "samples": k}

    def score(self, texts: list[str], finished: list[bool], comp_ids: list[list[int]], k: int) -> dict[str, np.ndarray]:
        """Judge and reward-model scores, (prompts, k), of k answers per prompt in prompt order."""
        from tasks.lib.rl import rewards_of

        t = self.t
        qs = [q for q in self.questions for _ in range(k)]
        refs = [r for r in self.references for _ in range(k)]
        gold = self.judge.scores(texts, qs, refs, finished)
        max_len = self.scorer.cfg.max_seq_len
        rm = []
        with torch.no_grad(), self.autocast:
            seqs = [t.scored(t.prompt(q), c, max_len) for q, c in zip(qs, comp_ids)]
            for i in range(0, len(seqs), 64):  # the reward model's output is normalised inside it
                rm += rewards_of(self.scorer, seqs[i : i + 64], t.pad).tolist()
        n = len(self.questions)
        return {"gold": np.asarray(gold).reshape(n, k), "rm": np.asarray(rm).reshape(n, k)}

    def baseline(self, answers: list[str]) -> dict[str, Any]:
        """One fixed, finished answer per prompt, scored like a model's."""
        comp_ids = [self.t.text_ids(a) + [self.t.end_turn] for a in answers]
        out = self.score(answers, [True] * len(answers), comp_ids, 1)
        return {**out, "texts": list(answers), "finished": [True] * len(answers), "comp_ids": comp_ids, "samples": 1}

    def summary(self, out: dict) -> dict[str, float]:
        k = out["samples"]
        m = {
            "gold_score": float(out["gold"].mean()),
            "rm_score": float(out["rm"].mean()),
            "distinct_1": distinct_n(out["comp_ids"], 1),
            "distinct_2": distinct_n(out["comp_ids"], 2),
            "response_length": float(np.mean([len(c) for c in out["comp_ids"]])),
            "finished_share": float(np.mean(out["finished"])),
        }
        if k > 1:
            m["self_similarity"] = self_similarity([out["texts"][i : i + k] for i in range(0, len(out["texts"]), k)])
        if "entropy" in out:
            m["mean_token_entropy"] = out["entropy"]
        return m


def best_of(out: dict, n: int) -> dict[str, Any]:
    """Best-of-n (Gao et al. 2023): per prompt, the one of the first n samples that the reward
    model scores highest (the first of equals), as a one-sample result."""
    k = out["samples"]
    pick = out["rm"][:, :n].argmax(1)
    rows = [i * k + int(j) for i, j in enumerate(pick)]
    idx = np.arange(len(pick))
    return {"gold": out["gold"][idx, pick][:, None], "rm": out["rm"][idx, pick][:, None], "texts": [out["texts"][r] for r in rows],
            "finished": [out["finished"][r] for r in rows], "comp_ids": [out["comp_ids"][r] for r in rows], "samples": 1}


def best_constant(judge, candidates: list[str], questions: list[str], references: list[str]) -> tuple[str, float]:
    """The candidate answer with the highest mean judge score over these prompts (ties: the
    first in sorted order), and that score."""
    cands = sorted(set(candidates))
    means = judge.constant_scores(cands, questions, references).mean(1)
    best = int(np.argmax(means))
    return cands[best], float(means[best])


# ---------------------------------------------------------------------------- losses
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
    """Histograms of the reward-model and gold scores per model and baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, out in outs.items():
        axes[0].hist(out["rm"].ravel(), bins=20, alpha=0.5, label=name)
        axes[1].hist(out["gold"].ravel(), bins=20, alpha=0.5, label=name)
    axes[0].set_title("reward-model score (normalised)")
    axes[1].set_title("gold judge score")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def markdown(metrics: dict, examples: list[dict], outs: dict[str, dict], n_samples: int) -> str:  # pragma: no mutate block (report layout)
    rows = [*MODELS, *COMPARATORS, *BASELINES]
    lines = ["# Evaluation: every model and baseline, one judge", "",
             f"{metrics['prompts']} held-out prompts, {metrics['samples_per_prompt']} samples each (baselines: one answer). "
             "Win rate and score difference are paired per prompt over all samples, with 95% bootstrap intervals.", "",
             "| | gold score | RM score | win rate vs SFT [95% CI] | score − SFT [95% CI] | finished | length |", "|---|---|---|---|---|---|---|"]
    for name in rows:
        m = metrics["models"].get(name) or metrics["baselines"].get(name)
        c = metrics["comparisons"].get(f"{name}_vs_sft")
        win = f"{c['win_rate']:.3f} [{c['win_ci_low']:.3f}, {c['win_ci_high']:.3f}]" if c else "–"
        diff = f"{c['diff']:+.4f} [{c['diff_ci_low']:+.4f}, {c['diff_ci_high']:+.4f}]" if c else "–"
        lines.append(f"| {name} | {m['gold_score']:.4f} | {m['rm_score']:.3f} | {win} | {diff} | {m['finished_share']:.2f} | {m['response_length']:.1f} |")
    lines += ["", f"Constant answer: *{metrics['constant_answer']}*; SFT's best temperature: {metrics['baselines']['sft_best_temperature']['temperature']}.", "",
              "| language model | bits per byte | val perplexity | SFT val loss | multiple choice acc (chance) |", "|---|---|---|---|---|"]
    for name in MODELS:
        m = metrics["models"][name]
        lines.append(f"| {name} | {m['bits_per_byte']:.4f} | {m['val_perplexity']:.1f} | {m['sft_val_loss']:.3f} | "
                     f"{m['benchmark_acc']:.3f} ({metrics['benchmark']['chance']:.2f}) |")
    lines += ["", "![score distributions](score_distributions.png)", "", "## Samples", ""]
    for i, ex in enumerate(examples[:n_samples]):
        lines += [f"### {ex['messages'][0]['content']}", "", f"*reference:* {ex['messages'][1]['content']}", ""]
        for name in MODELS:
            k = outs[name]["samples"]
            lines.append(f"- **{name}:** {outs[name]['texts'][i * k] or '(empty)'}")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- promotion
def promote(pr, candidates: dict[str, str | None], metrics: dict, comparisons: dict[str, dict], compare_champion) -> dict[str, Any]:
    """Tag the evaluated versions, then move `champion` or set `challenger` (step 8).
    `pr`: the promotion settings; `candidates`: {evaluated model: its registered version of
    `pr.model`}; `comparisons[model]`: its paired comparisons with sft, sft_best_temperature
    and constant; `compare_champion(model, version) -> comparison`: the candidate against the
    current champion, re-measured on this run's prompts."""
    from tasks.lib import registry

    registered = {m: v for m, v in candidates.items() if v is not None}
    champion_version = registry.alias_version(pr.model, "champion")
    base = {"model": pr.model, "rule": f"win-rate lower bounds > 0.5 + {pr.min_margin} vs sft, sft_best_temperature and champion; "
                                       "score difference vs constant > 0", "champion_version": champion_version}
    if not registered:
        return {**base, "decision": "none", "candidate": None, "candidate_version": None,
                "reason": f"no evaluated {pr.model} checkpoint is a registered version"}
    # the best candidate by its win rate against SFT competes (several aligned methods, one alias)
    name = max(registered, key=lambda m: (comparisons[m]["sft"]["win_rate"], m))
    version = registered[name]
    if champion_version == version:
        return {**base, "decision": "unchanged", "candidate": name, "candidate_version": version,
                "reason": f"version {version} is already the champion"}
    vs = dict(comparisons[name])
    vs["champion"] = compare_champion(name, champion_version) if champion_version is not None else None
    ok, reason = decide(vs, pr.min_margin)
    decision = "champion" if ok else "challenger"
    registry.set_alias(pr.model, decision, version)
    record = {**base, "decision": decision, "candidate": name, "candidate_version": version, "reason": reason,
              **{f"vs_{k}": v for k, v in vs.items()}}
    registry.tag_version(pr.model, version, {"promotion.decision": decision, "promotion.reason": reason[:4900],
                                             **{f"promotion.vs_{k}.{f}": round(v[f], 6) for k, v in vs.items() if v
                                                for f in ("win_rate", "win_ci_low", "diff", "diff_ci_low")}})
    return record


def select_prompts(examples: list[dict], template, max_prompt_tokens: int, seed: int) -> list[dict]:
    """Every usable held-out prompt, in a seeded order (the report's samples are its head)."""
    from tasks.lib.instructions import sample

    usable = [ex for ex in examples if len(template.prompt(ex["messages"][0]["content"])) <= max_prompt_tokens]
    return sample(usable, len(usable), seed, "evaluate")


def pretraining_texts(mix_dir: Path, dedup_dir: Path):
    """The text of every pretraining training document (each once, whatever its epochs), per source."""
    from tasks.lib.mixture import read_index
    from tasks.lib.storage import read_shard_table

    for source, entries in read_index(mix_dir, dedup_dir).items():
        for path, counts, _ in entries:
            rows = np.flatnonzero(counts > 0)
            if len(rows):
                yield source, read_shard_table(path, ["text"]).column("text").take(rows)


# ---------------------------------------------------------------------------- the stage
def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:  # pragma: no mutate block (wiring: tests/test_pipeline.py)
    import mlflow

    from tasks.lib import benchmarks, instructions, registry, tracking
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.compare import compare, prompts_for_half_width, worst_case_half_width
    from tasks.lib.contamination import NgramIndex
    from tasks.lib.judge import Judge
    from tasks.lib.model import load_checkpoint
    from tasks.lib.runtime import Runtime
    from tasks.lib.scoring import corpus_losses, multiple_choice, token_bytes
    from tasks.lib.template import Template
    from tasks.lib.tokens import token_files

    cfg, jd = params.evaluate, params.judge
    tok = load_tokenizer(inputs["sft"])
    t = Template(tok)
    splits = instructions.splits(params.instructions, params.seed)
    # 1. prompts, contamination, the interval's width
    examples = select_prompts(splits["eval"], t, params.instructions.max_prompt_tokens, params.seed)
    cc = cfg.contamination
    index = NgramIndex({f: [ex["messages"][i]["content"] for ex in examples] for i, f in enumerate(("prompt", "reference"))}, cc.ngram)
    for source, texts in pretraining_texts(inputs["mix"], inputs["dedup"]):
        index.scan(f"pretrain:{source}", texts)
    index.scan("sft", [m["content"] for ex in splits["sft"] for m in ex["messages"]])
    contamination = index.report()
    dirty = index.dirty()
    if cc.action == "drop":
        examples = [ex for i, ex in enumerate(examples) if not dirty[i]]
        dirty = np.zeros(len(examples), dtype=bool)
    need = prompts_for_half_width(cfg.max_ci_half_width)
    if len(examples) < need:
        raise StageError(f"the eval split has {len(examples)} usable prompts{' after dropping contaminated ones' if cc.action == 'drop' else ''}; "
                         f"a 95% interval no wider than +-{cfg.max_ci_half_width} (evaluate.max_ci_half_width) needs {need}: "
                         "raise instructions.split.eval, or the half-width")
    rt = Runtime(cfg.compute)
    scorer, _ = load_checkpoint(inputs["reward"], rt.device)
    scorer.eval()
    corpus = [(ex["messages"][0]["content"], ex["messages"][1]["content"]) for split in splits.values() for ex in split]
    judge = Judge(corpus, jd.repetition_penalty, jd.unfinished_penalty, jd.contrast_references)
    ev = Evaluator(params, t, scorer, judge, examples, instructions.sample(splits["sft"], cfg.few_shot, params.seed, "few-shot"), rt.autocast,
                   rt.compiled)
    # 3. baselines first: a judge under which the reference loses to a trivial answer is refused before any sampling
    constant, _ = best_constant(judge, [ex["messages"][1]["content"] for ex in splits["sft"]], ev.questions, ev.references)
    outs: dict[str, dict] = {"constant": ev.baseline([constant] * len(examples)), "prompt_copy": ev.baseline(ev.questions),
                             "reference": ev.baseline(ev.references)}
    ceiling = outs["reference"]["gold"].mean()
    beaten = [b for b in ("constant", "prompt_copy") if outs[b]["gold"].mean() >= ceiling]
    if beaten:
        raise StageError(f"the judge scores the reference answers ({ceiling:.4f}) no higher than the {beaten[0]} baseline "
                         f"({outs[beaten[0]]['gold'].mean():.4f}): check the judge settings in params.yaml (judge.*)")
    # 2. generate
    models = {name: load_checkpoint(inputs[name], rt.device)[0].eval() for name in MODELS}
    for name in MODELS:
        outs[name] = ev.run(models[name], chat=name != "base", name=name)
    sweep = {cfg.sampling.temperature: outs["sft"]}
    for temp in cfg.sft_temperatures:
        if temp not in sweep:
            sweep[temp] = ev.run(models["sft"], chat=True, name=f"sft T={temp}", temperature=temp, samples=1 if temp == 0 else None)
    best_temp = max(sweep, key=lambda T: (sweep[T]["gold"].mean(), -T))
    outs["sft_best_temperature"] = sweep[best_temp]
    outs["best_of_n"] = best_of(outs["sft"], cfg.best_of_n)
    # 4-5. metrics and paired comparisons
    metrics: dict[str, Any] = {"prompts": len(examples), "samples_per_prompt": cfg.samples_per_prompt,
                               "max_ci_half_width": float(worst_case_half_width(len(examples))),
                               "coverage": instructions.coverage(examples), "models": {}, "baselines": {}, "comparisons": {},
                               "sft_temperature_sweep": {str(T): float(o["gold"].mean()) for T, o in sorted(sweep.items())},
                               "contamination": contamination}
    for name in (*MODELS, *COMPARATORS, *BASELINES):
        m = ev.summary(outs[name])
        if dirty.any() and not dirty.all():
            m["gold_score_clean"] = float(outs[name]["gold"][~dirty].mean())
        (metrics["models"] if name in MODELS else metrics["baselines"])[name] = m
    metrics["baselines"]["sft_best_temperature"]["temperature"] = float(best_temp)
    seed = params.seed
    for name in (*MODELS, *COMPARATORS, *BASELINES):
        if name != "sft":
            metrics["comparisons"][f"{name}_vs_sft"] = compare(outs[name]["gold"], outs["sft"]["gold"], seed, cfg.bootstrap_resamples)
    per_candidate = {}
    for name in ALIGNED:
        per_candidate[name] = {"sft": metrics["comparisons"][f"{name}_vs_sft"]}
        for other in (*COMPARATORS, *BASELINES):
            c = compare(outs[name]["gold"], outs[other]["gold"], seed, cfg.bootstrap_resamples)
            metrics["comparisons"][f"{name}_vs_{other}"] = c
            per_candidate[name][other] = c
        metrics["comparisons"][f"{name}_vs_sft_rm"] = compare(outs[name]["rm"], outs["sft"]["rm"], seed, cfg.bootstrap_resamples)
    # 6. language-model figures and the built-in benchmark
    _, val, _ = token_files(inputs["tokens"])
    bytes_of = token_bytes(tok)
    items = benchmarks.doc_match(examples, [ex["messages"][1]["content"] for ex in examples], cfg.benchmark.choices, seed)
    shots = benchmarks.doc_match_prefix(instructions.sample(splits["sft"], cfg.benchmark.few_shot, seed, "benchmark-shots"))
    metrics["benchmark"] = {"task": "doc_match", "items": len(items), "choices": cfg.benchmark.choices, "chance": 1 / cfg.benchmark.choices}
    for name in MODELS:
        m = metrics["models"][name]
        lm = corpus_losses(models[name], val, bytes_of, models[name].cfg.max_seq_len - 1, max_tokens=cfg.bpb_max_tokens, autocast=rt.autocast)
        m["bits_per_byte"], m["val_perplexity"] = lm["bits_per_byte"], lm["perplexity"]
        with rt.autocast:
            m["sft_val_loss"] = sft_val_loss(models[name], t, splits["sft_val"], params)
        mc = multiple_choice(models[name], tok, items, [t.eot, *t.text_ids(shots)], t.text_ids, t.pad, autocast=rt.autocast)
        m["benchmark_acc"], m["benchmark_acc_norm"] = mc["acc"], mc["acc_norm"]
    metrics["val_tokens_scored"] = lm["tokens"]
    metrics["constant_answer"] = constant
    # 7. report
    with atomic_dir(outputs["report"]) as rep:
        shown = {n: outs[n] for n in (*MODELS, "best_of_n", "constant", "reference")}
        score_plot(rep / "score_distributions.png", shown)
        with atomic_file(rep / "report.md") as fh:
            fh.write(markdown(metrics, examples, outs, cfg.samples_in_report))
        write_json(rep / "samples.json", [{"prompt": q, "reference": r, "contaminated": bool(d),
                                           **{n: outs[n]["texts"][i * outs[n]["samples"]] for n in MODELS}}
                                          for i, (q, r, d) in enumerate(zip(ev.questions, ev.references, dirty))])
        write_json(rep / "baselines.json", {"constant": constant, "sft_best_temperature": best_temp,
                                            "judge": jd.model_dump(), "contaminated_prompts": [q for q, d in zip(ev.questions, dirty) if d]})
        for name in (*MODELS, *COMPARATORS, *BASELINES):
            write_json(rep / f"scores_{name}.json", [{"sample": i, "rm": float(r), "gold": float(g)}
                                                     for i, (r, g) in enumerate(zip(outs[name]["rm"].ravel(), outs[name]["gold"].ravel()))])
    # 8. registry
    pr = cfg.promotion
    for name in MODELS:
        version = registry.version_of(name if name not in ALIGNED else pr.model, inputs[name])
        if version is not None:
            registry.tag_version(name if name not in ALIGNED else pr.model, version,
                                 {f"eval.{k}": round(v, 6) for k, v in metrics["models"][name].items() if isinstance(v, float)})

    def compare_champion(name: str, version: str) -> dict:
        champ = load_checkpoint(registry.download_checkpoint(f"models:/{pr.model}/{version}"), rt.device)[0].eval()
        return compare(outs[name]["gold"], ev.run(champ, chat=True, name="champion")["gold"], seed, cfg.bootstrap_resamples)

    candidates = {name: registry.version_of(pr.model, inputs[name]) for name in ALIGNED}
    for name in MODELS:  # the evaluation in each version's model card
        reg = pr.model if name in ALIGNED else name
        version = candidates.get(name) if name in ALIGNED else registry.version_of(name, inputs[name])
        if version is not None:
            m = metrics["models"][name]
            c = metrics["comparisons"].get(f"{name}_vs_sft")
            vs = f"; win rate vs SFT {c['win_rate']:.3f} [{c['win_ci_low']:.3f}, {c['win_ci_high']:.3f}]" if c else ""
            registry.append_description(reg, version, f"Evaluation ({len(examples)} held-out prompts x {cfg.samples_per_prompt}): gold judge "
                                        f"{m['gold_score']:.4f} (reference {metrics['baselines']['reference']['gold_score']:.3f}, constant answer "
                                        f"{metrics['baselines']['constant']['gold_score']:.4f}){vs}; bits per byte {m['bits_per_byte']:.3f}; "
                                        f"doc_match {m['benchmark_acc']:.3f} (chance {metrics['benchmark']['chance']:.2f})")
    decision = promote(pr, candidates, metrics, per_candidate, compare_champion)
    if decision.get("candidate_version"):
        registry.append_description(pr.model, decision["candidate_version"], f"Promotion: {decision['decision']} ({decision['reason']})")
    log.info("promotion of %s: %s (%s)", decision["model"], decision["decision"], decision["reason"])
    if mlflow.active_run():
        tracking.set_tags({"promotion.decision": decision["decision"], "promotion.reason": decision["reason"][:4900]})
        mlflow.log_dict(decision, "promotion.json")
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
