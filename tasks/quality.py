"""quality: heuristic rules + a fastText quality classifier, as Gopher/C4 and GPT-3 did.

    python -m tasks.quality            # what `dvc repro quality` runs

1. Rules (thresholds in `quality.rules`) on the roles listed there: word-count bounds, mean
   word length, symbol-to-word ratio, share of words with a letter, share of lines ending in
   punctuation, repeated lines, top 2-gram and repeated 5-gram coverage, boilerplate phrases.
   Each rule returns keep-or-reason, e.g. `(False, "too_few_words")`.
2. A fastText classifier trained as GPT-3's: documents of `reference` sources are positives,
   `crawl` sources negatives; precision/recall/AUC on a held-out split. Applied to the roles
   in `quality.classifier.apply_to_roles`, keeping a document when its score passes the
   threshold, or by GPT-3's rule `np.random.pareto(alpha) > 1 - score` (seeded).

Outputs: `data/filtered/<source>/` (kept, with `quality_score` in meta), `data/dropped/<source>/`
(dropped, with `drop_reason` in meta, for inspection), `models/quality/model.bin`. Metrics:
kept/dropped per source and reason, classifier held-out metrics, score histogram, and on
generated crawl pages precision/recall of the filter against their ground truth.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Classifier, Params, Rules
from tasks.storage import ShardWriter, StageError, atomic_dir, progress, read_docs, source_folders, write_json

STAGE = "quality"
PARAMS = ("seed", "collect.sources", "quality")
INPUTS = ("raw",)
OUTPUTS = ("filtered", "dropped", "quality_model")

HQ, LQ = "__label__hq", "__label__lq"
PUNCT_END = tuple(".!?:;\"')]")
SYMBOLS = re.compile(r"#|\.\.\.|…")


# ------------------------------------------------------------------------ 1. rules
def rule_filter(text: str, cfg: Rules) -> tuple[bool, str | None]:
    """Keep (True, None) or drop (False, reason) by the Gopher/C4-style heuristics."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return False, "too_few_words"
    if n > cfg.max_words:
        return False, "too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return False, "mean_word_length"
    if len(SYMBOLS.findall(text)) / n > cfg.max_symbol_word_ratio:
        return False, "symbol_ratio"
    if sum(any(c.isalpha() for c in w) for w in words) / n < cfg.min_alpha_word_fraction:
        return False, "non_alpha_words"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if sum(ln.endswith(PUNCT_END) for ln in lines) / len(lines) < cfg.min_punct_line_fraction:
        return False, "few_punct_lines"
    if (len(lines) - len(set(lines))) / len(lines) > cfg.max_duplicate_line_fraction:
        return False, "duplicate_lines"
    lower = [w.lower() for w in words]
    total_chars = sum(len(w) for w in lower)
    if n >= 2:
        (a, b), count = Counter(zip(lower, lower[1:])).most_common(1)[0]
        if count > 1 and count * (len(a) + len(b)) / total_chars > cfg.max_top_2gram_fraction:
            return False, "top_2gram"
    if n >= 5:
        grams = list(zip(*(lower[i:] for i in range(5))))
        counts = Counter(grams)
        covered = np.zeros(n, dtype=bool)
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i : i + 5] = True
        dup_chars = sum(len(w) for w, c in zip(lower, covered) if c)
        if dup_chars / total_chars > cfg.max_duplicate_5gram_fraction:
            return False, "duplicate_5grams"
    phrases = [p.lower() for p in cfg.boilerplate_phrases]
    if phrases:
        boiler = sum(any(p in ln.lower() for p in phrases) for ln in lines)
        if boiler / len(lines) > cfg.max_boilerplate_line_fraction:
            return False, "boilerplate"
    return True, None


# ------------------------------------------------------------------------ 2. classifier
def ft_text(text: str, max_chars: int) -> str:
    # fastText rejects newlines; lower-casing makes a small corpus go further.
    return " ".join(text[:max_chars].lower().split())


def in_holdout(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "big")
    return h / 2**32 < fraction


def _fit_fasttext(train_file: str, model_path: str, kwargs: dict) -> str | None:
    """Runs in a fresh process: returns None on success or the error message."""
    import fasttext

    try:
        fasttext.train_supervised(input=train_file, **kwargs).save_model(model_path)
        return None
    except RuntimeError as err:
        return str(err)


def train_classifier(pos: list[str], neg: list[str], cfg: Classifier, seed: int, model_path: Path):
    import fasttext

    if not pos or not neg:
        raise StageError("the quality classifier needs documents of both a 'reference' and a 'crawl' source")
    # As GPT-3: the negatives are a sample of the crawl, as many as there are positives, so
    # the classes are balanced and most crawl documents are scored by a model that never
    # saw them (scoring its own training negatives would push good pages down).
    rng = np.random.default_rng(seed)
    if len(neg) > len(pos):
        neg = [neg[i] for i in sorted(rng.choice(len(neg), size=len(pos), replace=False))]
    lines = [f"{HQ} {t}" for t in pos] + [f"{LQ} {t}" for t in neg]
    order = rng.permutation(len(lines))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as fh:
        fh.write("\n".join(lines[i] for i in order) + "\n")
        train_file = fh.name
    kwargs = dict(epoch=cfg.epoch, lr=cfg.lr, dim=cfg.dim, wordNgrams=cfg.word_ngrams, minCount=cfg.min_count,
                  bucket=cfg.bucket, thread=1, seed=seed, verbose=0)  # 1 thread: no Hogwild races
    # fastText keeps state between trainings in one process: a second training there gives
    # different weights and sometimes "Encountered NaN" (seen with fasttext 0.9.3 and
    # fasttext-numpy2 0.10.4). Each training therefore runs in a fresh process, where it is
    # deterministic.
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            error = pool.submit(_fit_fasttext, train_file, str(model_path), kwargs).result()
    finally:
        Path(train_file).unlink()
    if error:
        raise StageError(f"fastText training failed ({error}); try a lower quality.classifier.lr (now {cfg.lr})")
    return fasttext.load_model(str(model_path))


def hq_scores(model, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict(texts, k=2)
    return np.array([dict(zip(ls, ps)).get(HQ, 0.0) for ls, ps in zip(labels, probs)], dtype=np.float64)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def precision_recall(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((pred & truth).sum())
    return {
        "precision": tp / max(int(pred.sum()), 1),
        "recall": tp / max(int(truth.sum()), 1),
        "support": int(truth.sum()),
    }


# ------------------------------------------------------------------------ the stage
def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    cfg = params.quality
    roles = {s.name: s.role for s in params.collect.sources}
    docs = {name: read_docs(folder) for name, folder in source_folders(inputs["raw"]).items() if name in roles}

    # 1. Rules
    verdict: dict[str, tuple[bool, str | None]] = {}
    for name, rows in docs.items():
        if roles[name] not in cfg.rules.roles:
            continue
        for row in progress(rows, desc=f"rules {name}"):
            verdict[row["id"]] = rule_filter(row["text"], cfg.rules)

    # 2. Classifier: train on raw reference (+) vs raw crawl (-), held-out split by id hash.
    c = cfg.classifier
    train_pos, train_neg, held_texts, held_labels = [], [], [], []
    for name, rows in docs.items():
        if roles[name] not in ("reference", "crawl"):
            continue
        label = int(roles[name] == "reference")
        for row in rows:
            t = ft_text(row["text"], c.max_chars)
            if in_holdout(row["id"], c.holdout_fraction):
                held_texts.append(t)
                held_labels.append(label)
            else:
                (train_pos if label else train_neg).append(t)
    metrics: dict[str, Any] = {"sources": {}}
    with atomic_dir(outputs["quality_model"]) as model_dir:
        model = train_classifier(train_pos, train_neg, c, params.seed, model_dir / "model.bin")
        write_json(model_dir / "labels.json", {"positive": HQ, "negative": LQ, "max_chars": c.max_chars})
    held_scores = hq_scores(model, held_texts)
    held_y = np.array(held_labels, dtype=int)
    metrics["classifier"] = {
        **precision_recall(held_scores >= c.threshold, held_y == 1),
        "auc": auc(held_scores, held_y),
        "train_docs": len(train_pos) + len(train_neg),
        "heldout_docs": len(held_y),
    }

    # 3. Apply: rules verdict, then the classifier on the roles that ask for it.
    rng = np.random.default_rng(params.seed)
    hist = np.zeros(10, dtype=int)
    truth_low, pred_drop = [], []
    with atomic_dir(outputs["filtered"]) as kept_dir, atomic_dir(outputs["dropped"]) as drop_dir:
        for name, rows in docs.items():
            kept_w = ShardWriter(kept_dir / name, params.collect.shard_docs)
            drop_w = ShardWriter(drop_dir / name, params.collect.shard_docs) if cfg.write_dropped else None
            reasons: Counter[str] = Counter()
            classify = roles[name] in c.apply_to_roles
            scores = hq_scores(model, [ft_text(r["text"], c.max_chars) for r in rows]) if classify else None
            for i, row in enumerate(rows):
                keep, reason = verdict.get(row["id"], (True, None))
                meta = json.loads(row["meta"])
                if scores is not None:
                    s = float(scores[i])
                    meta["quality_score"] = round(s, 6)
                    hist[min(int(s * 10), 9)] += 1
                    draw = rng.pareto(c.pareto_alpha)  # drawn for every doc: stable across rule changes
                    if keep:
                        passed = draw > 1 - s if c.keep_rule == "pareto" else s >= c.threshold
                        keep, reason = (True, None) if passed else (False, "classifier")
                if "is_low_quality" in meta:
                    truth_low.append(bool(meta["is_low_quality"]))
                    pred_drop.append(not keep)
                if keep:
                    kept_w.add({**row, "meta": json.dumps(meta, sort_keys=True)})
                else:
                    reasons[reason] += 1
                    if drop_w:
                        drop_w.add({**row, "meta": json.dumps({**meta, "drop_reason": reason}, sort_keys=True)})
            kept = kept_w.close()
            if drop_w:
                drop_w.close()
            metrics["sources"][name] = {"docs_in": len(rows), "kept": kept, "dropped": dict(sorted(reasons.items())), "classified": classify}
    metrics["docs_in"] = sum(s["docs_in"] for s in metrics["sources"].values())
    metrics["kept"] = sum(s["kept"] for s in metrics["sources"].values())
    metrics["score_histogram"] = {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": int(h) for i, h in enumerate(hist)}
    if truth_low:
        metrics["vs_ground_truth"] = precision_recall(np.array(pred_drop), np.array(truth_low))
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(STAGE, run, PARAMS, INPUTS, OUTPUTS))
