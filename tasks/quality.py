"""quality: line and document rules, language ID and a fastText classifier, shard by shard.

    python -m tasks.quality            # what `dvc repro quality` runs

Per document (roles as configured), in this order:
1. lines (C4 works on lines, not pages): lines holding a boilerplate phrase as whole words
   ("log in" matches "Log in!", not "changelog in"), navigation lines ("Home | About | Blog")
   and short lines without terminal punctuation (buttons) are removed from the text;
   counted per reason
2. language, first, so that the rules know it: fastText's lid.176 (default) or langid.py,
   both offline (tasks/lib/languages.py), on the first characters; kept when the language
   is listed with enough probability
3. document rules (Gopher, C4) for that language: word count bounds, mean word length,
   symbol-to-word ratio, words with a letter, the language's stop words, bullet lines,
   ellipsis lines, lines ending in punctuation, repeated lines, top 2-gram and repeated
   5-gram coverage, boilerplate share; each returns keep-or-reason, e.g.
   `(False, "too_few_words")`. A rule that cannot apply to a language (no stop-word list;
   word rules for scripts without spaces) is skipped for it and counted (`rules_skipped`)
4. classifier (optional, `classifier.enabled`): fastText trained as GPT-3's, reference (+)
   against crawl (-), on the line-cleaned text, so it learns the prose rather than the page
   chrome; the negatives are drawn to match the positives' length distribution
   (`match_length`), so length alone does not separate them; kept when the score passes the
   threshold, by GPT-3's rule `np.random.pareto(alpha) > 1 - score`, or when it is in the
   top `keep_fraction` of the crawl (DCLM's rule: the threshold is that quantile of the
   crawl training sample's scores)

The training sample is read first (bounded: at most `classifier.max_train_docs` per class,
chosen by a hash of the id); then every shard is filtered in parallel
(tasks/lib/executor.py), one at a time per worker. Outputs: `data/filtered/<source>/`
(kept, cleaned text, `quality_score` in meta), `data/dropped/<source>/` (with `drop_reason`),
`models/quality/model.bin`. Metrics: kept/dropped per source and reason, lines removed,
classifier precision/recall and AUC (by ranks) on held-out documents, score histogram,
topicality (Spearman correlation of the scores of held-out crawl pages that passed the
rules, the ones the classifier decides on, with their length and with the share of their
words from the reference's vocabulary; a warning when either reaches 0.5: the classifier
then keeps long or on-topic pages, not good ones), and on generated
crawl pages precision/recall against their ground truth.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import Params
from tasks.lib.errors import StageError
from tasks.lib.hashing import in_fraction, unit_interval
from tasks.lib.languages import fit_fasttext, identify, spaceless, stop_words
from tasks.lib.executor import orphan_guard
from tasks.lib.storage import DOC_SCHEMA, atomic_dir, read_shard_table, shard_files, shard_rows, source_folders, write_json

STAGE = "quality"
PARAMS = ("seed", "collect.sources", "quality")
UNTRACKED = ("executor",)
INPUTS = ("raw",)
OUTPUTS = ("filtered", "dropped", "quality_model")

log = logging.getLogger(STAGE)

HQ, LQ = "__label__hq", "__label__lq"
PUNCT_END = tuple(".!?:;\"')]”’。！？；：」』）")  # and the full-width ends of CJK sentences
SYMBOLS = re.compile(r"#|\.\.\.|…")
BULLETS = ("•", "●", "▪", "‣", "◦", "-", "*", "·")
NAV_SEPARATORS = {"|", "·", "»", "›", "•", "/"}
NO_LETTER_ASCII = re.compile(r"(?<!\S)[^\sA-Za-z]+(?!\S)")  # a whitespace-separated word without a letter, in ASCII text


# ------------------------------------------------------------------------ 1. lines
def phrase_pattern(phrases: list[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive match of any phrase (spaces match any whitespace)."""
    if not phrases:
        return None
    alts = sorted((r"\s+".join(map(re.escape, p.lower().split())) for p in phrases if p.strip()), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def clean_lines(text: str, cfg: Any, pattern: re.Pattern | None) -> tuple[str, Counter]:
    """The text without boilerplate lines and short unpunctuated lines; removed lines per reason."""
    kept, removed = [], Counter()
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            kept.append(line)
            continue
        tokens = s.split()
        if pattern is not None and pattern.search(s):
            removed["boilerplate_line"] += 1
        elif sum(t in NAV_SEPARATORS for t in tokens) >= 2:  # "Home | About | Blog"
            removed["menu_line"] += 1
        elif len(tokens) < cfg.min_line_words and not s.endswith(PUNCT_END):
            removed["short_line"] += 1
        else:
            kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip(), removed


# ------------------------------------------------------------------------ 2. documents
@functools.cache
def _no_letter_word() -> re.Pattern:
    """A whitespace-separated word without a letter in any script: a character class of every
    code point Python's str.isalpha() accepts, built once per process (a quarter second)."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        letter = cp <= sys.maxunicode and chr(cp).isalpha()
        if letter and start is None:
            start = cp
        elif not letter and start is not None:
            ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            start = None
    return re.compile(r"(?<!\S)[^\s" + "".join(ranges) + r"]+(?!\S)")


def letter_words(text: str, n_words: int) -> int:
    """How many of the text's `n_words` whitespace-separated words hold a letter: the count of
    sum(any(c.isalpha() for c in w) for w in text.split()), found by one regular-expression scan
    for the words without one (that generator was a third of the rules' time)."""
    return n_words - len((NO_LETTER_ASCII if text.isascii() else _no_letter_word()).findall(text))


def rule_filter(text: str, cfg: Any, pattern: re.Pattern | None = None, lang: str | None = None,
                skipped: Counter | None = None) -> tuple[bool, str | None]:
    """Keep (True, None) or drop (False, reason) by the Gopher/C4-style heuristics, for the
    document's language `lang` (None: language ID off, English lists). Rules that cannot
    apply to the language are skipped and counted in `skipped` as `<rule>:<lang>`."""
    words = text.split()
    per_word = spaceless(lang)
    # scripts without spaces: words estimated from letters; word-shape rules do not apply
    n = int(sum(c.isalpha() for c in text) / per_word) if per_word else len(words)
    if n < cfg.min_words:
        return False, "too_few_words"
    if n > cfg.max_words:
        return False, "too_many_words"
    if per_word:
        if skipped is not None:
            skipped.update(f"{rule}:{lang}" for rule in ("mean_word_length", "few_stop_words", "top_2gram", "duplicate_5grams"))
    else:
        mean_len = sum(len(w) for w in words) / n
        if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
            return False, "mean_word_length"
    if len(SYMBOLS.findall(text)) / n > cfg.max_symbol_word_ratio:
        return False, "symbol_ratio"
    if not per_word and letter_words(text, n) / n < cfg.min_alpha_word_fraction:
        return False, "non_alpha_words"
    lower = [w.lower().strip(".,;:!?\"'()[]") for w in words]
    stops = stop_words(lang)
    if stops is None and not per_word and skipped is not None:
        skipped[f"few_stop_words:{lang}"] += 1
    if stops is not None and not per_word and len(stops.intersection(lower)) < cfg.min_stop_words:
        return False, "few_stop_words"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_line_fraction:
        return False, "bullet_lines"
    if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_line_fraction:
        return False, "ellipsis_lines"
    if sum(ln.endswith(PUNCT_END) for ln in lines) / len(lines) < cfg.min_punct_line_fraction:
        return False, "few_punct_lines"
    if (len(lines) - len(set(lines))) / len(lines) > cfg.max_duplicate_line_fraction:
        return False, "duplicate_lines"
    total_chars = sum(len(w) for w in lower) or 1
    if per_word:
        lower = []  # no whitespace words to count n-grams over
    if len(lower) >= 2:
        (a, b), count = Counter(zip(lower, lower[1:])).most_common(1)[0]
        if count > 1 and count * (len(a) + len(b)) / total_chars > cfg.max_top_2gram_fraction:
            return False, "top_2gram"
    if len(lower) >= 5:
        grams = list(zip(*(lower[i:] for i in range(5))))
        counts = Counter(grams)
        covered = np.zeros(len(lower), dtype=bool)
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i : i + 5] = True
        dup_chars = sum(len(w) for w, c in zip(lower, covered) if c)
        if dup_chars / total_chars > cfg.max_duplicate_5gram_fraction:
            return False, "duplicate_5grams"
    if pattern is not None:
        boiler = sum(bool(pattern.search(ln)) for ln in lines)
        if boiler / len(lines) > cfg.max_boilerplate_line_fraction:
            return False, "boilerplate"
    return True, None


# ------------------------------------------------------------------------ 3. language
def language(text: str, max_chars: int, backend: str = "fasttext") -> tuple[str, float]:
    """(language code, probability) of one text (tasks/lib/languages.py)."""
    return identify([text], max_chars, backend)[0]


# ------------------------------------------------------------------------ 4. classifier
def ft_text(text: str, max_chars: int) -> str:
    # fastText rejects newlines; lower-casing makes a small corpus go further.
    return " ".join(text[:max_chars].lower().split())


def in_holdout(doc_id: str, fraction: float) -> bool:
    return in_fraction(doc_id, fraction, "quality:")


def train_classifier(pos: list[str], neg: list[str], cfg: Any, seed: int, model_path: Path) -> None:
    if not pos or not neg:
        raise StageError("the quality classifier needs documents of both a 'reference' and a 'crawl' source "
                         "(or set quality.classifier.enabled: false)")
    rng = np.random.default_rng(seed)
    lines = [f"{HQ} {t}" for t in pos] + [f"{LQ} {t}" for t in neg]
    order = rng.permutation(len(lines))
    train_file = model_path.with_name("train.txt")  # inside the output's temporary folder: a kill leaves nothing
    train_file.write_text("\n".join(lines[i] for i in order) + "\n", encoding="utf-8")
    kwargs = dict(epoch=cfg.epoch, lr=cfg.lr, dim=cfg.dim, wordNgrams=cfg.word_ngrams, minCount=cfg.min_count,
                  bucket=cfg.bucket, thread=1, seed=seed, verbose=0)  # 1 thread: no Hogwild races
    # fastText keeps state between trainings in one process: a second training there gives
    # different weights and sometimes "Encountered NaN". Each training therefore runs in a
    # fresh process, where it is deterministic; the process dies with this one.
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=orphan_guard) as pool:
            error = pool.submit(fit_fasttext, str(train_file), str(model_path), kwargs).result()
    finally:
        train_file.unlink()
    if error:
        raise StageError(f"fastText training failed ({error}); try a lower quality.classifier.lr (now {cfg.lr})")


def hq_scores(model, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict(texts, k=2)
    return np.array([dict(zip(ls, ps)).get(HQ, 0.0) for ls, ps in zip(labels, probs)], dtype=np.float64)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U, ties averaged): O(n log n)."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = int((pred & truth).sum())
    return {"precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(truth.sum()), 1), "support": int(truth.sum())}


# ------------------------------------------------------------------------ the map over shards
@dataclass(frozen=True)
class ShardTask:
    index: int
    source: str
    role: str
    path: str
    kept_out: str
    dropped_out: str | None
    model: str | None  # fastText model file, None: no classifier
    quality: Any  # the `quality` section (a frozen pydantic model: picklable)
    seed: int
    train_fraction: float  # share of this shard's non-held-out documents to return for training
    collect_training: bool


def _prepare(text: str, role: str, q: Any, pattern) -> tuple[str, Counter]:
    if role in q.lines.roles:
        return clean_lines(text, q.lines, pattern)
    return text, Counter()


def training_texts(task: ShardTask) -> list[str]:
    """The line-cleaned texts of the documents of this shard chosen for training."""
    q = task.quality
    pattern = phrase_pattern(q.rules.boilerplate_phrases)
    table = read_shard_table(Path(task.path), ["id", "text"])
    out = []
    for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
        if in_holdout(doc_id, q.classifier.holdout_fraction) or unit_interval(doc_id, "quality-train:") >= task.train_fraction:
            continue
        out.append(ft_text(_prepare(text, task.role, q, pattern)[0], q.classifier.max_chars))
    return out


def filter_shard(task: ShardTask) -> dict[str, Any]:
    """Apply lines, rules, language and classifier to one shard; write kept and dropped rows."""
    q = task.quality
    pattern = phrase_pattern(q.rules.boilerplate_phrases)
    table = read_shard_table(Path(task.path), None)
    ids, texts, metas = (table.column(c).to_pylist() for c in ("id", "text", "meta"))
    model = None
    classify = task.model is not None and task.role in q.classifier.apply_to_roles
    vocab: set[str] = set()
    if classify:
        import fasttext

        model = fasttext.load_model(task.model)
        vocab = set(json.loads(Path(task.model).with_name("vocab.json").read_text()))
    rng = np.random.default_rng([task.seed, task.index])  # one stream per shard: the same on any executor
    kept, dropped, reasons, lines_removed = [], [], Counter(), Counter()
    hist = np.zeros(10, dtype=np.int64)
    truth_pred = Counter()
    topic_rows: list[tuple[float, int, float]] = []  # held-out documents the classifier decides on: score, words, topic share
    cleaned = [_prepare(t, task.role, q, pattern) for t in texts]
    scores = hq_scores(model, [ft_text(c, q.classifier.max_chars) for c, _ in cleaned]) if classify else None
    identified = q.language.enabled and task.role in q.language.roles
    langs = identify([c for c, _ in cleaned], q.language.max_chars, q.language.identifier) if identified and cleaned else None
    skipped, by_language = Counter(), Counter()
    for i, (doc_id, meta_s) in enumerate(zip(ids, metas)):
        text, removed = cleaned[i]
        lines_removed.update(removed)
        meta = json.loads(meta_s)
        keep, reason, lang = True, None, None
        if langs is not None:  # language first: the rules below are that language's
            lang, prob = langs[i]
            meta["language"] = lang
            if lang not in q.language.languages or prob < q.language.min_probability:
                keep, reason = False, "language"
        if keep and task.role in q.rules.roles:
            # line cleaning removed every line holding a boilerplate phrase: the document rule
            # for them has nothing left to count, so it is not run (a fifth of the rules' time)
            keep, reason = rule_filter(text, q.rules, None if task.role in q.lines.roles else pattern, lang, skipped)
        if scores is not None:
            s = float(scores[i])
            meta["quality_score"] = round(s, 6)
            hist[min(int(s * 10), 9)] += 1
            draw = rng.pareto(q.classifier.pareto_alpha)  # drawn for every doc: stable across rule changes
            if keep and in_holdout(doc_id, q.classifier.holdout_fraction):
                topic_rows.append((s, len(text.split()), topic_share(text, vocab)))
            if keep:
                passed = draw > 1 - s if q.classifier.keep_rule == "pareto" else s >= q.classifier.threshold
                keep, reason = (True, None) if passed else (False, "classifier")
        if "is_low_quality" in meta:
            truth_pred[(bool(meta["is_low_quality"]), not keep)] += 1
        row = {"id": doc_id, "source": task.source, "text": text}
        if lang is not None:
            by_language[f"{lang}:{'kept' if keep else reason}"] += 1
        if keep:
            kept.append({**row, "meta": json.dumps(meta, sort_keys=True)})
        else:
            reasons[reason] += 1
            dropped.append({**row, "text": texts[i], "meta": json.dumps({**meta, "drop_reason": reason}, sort_keys=True)})
    for out, rows in ((task.kept_out, kept), (task.dropped_out, dropped)):
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=DOC_SCHEMA), out, compression="zstd")
    return {"docs": len(ids), "kept": len(kept), "reasons": dict(reasons), "lines_removed": dict(lines_removed),
            "hist": hist.tolist(), "truth_pred": {f"{t}:{p}": c for (t, p), c in truth_pred.items()},
            "rules_skipped": dict(skipped), "by_language": dict(by_language), "topic_rows": topic_rows}


def holdout_scores(task: ShardTask) -> tuple[list[float], list[int]]:
    """Classifier scores of this shard's held-out documents, with their labels (1 = reference)."""
    import fasttext

    q = task.quality
    pattern = phrase_pattern(q.rules.boilerplate_phrases)
    table = read_shard_table(Path(task.path), ["id", "text"])
    texts = [ft_text(_prepare(t, task.role, q, pattern)[0], q.classifier.max_chars)
             for d, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist()) if in_holdout(d, q.classifier.holdout_fraction)]
    scores = hq_scores(fasttext.load_model(task.model), texts) if texts else np.zeros(0)
    return scores.tolist(), [int(task.role == "reference")] * len(texts)


TOPIC_WORD = re.compile(r"[^\W\d_]{4,}")  # words of four letters or more: function words mostly shorter


def reference_vocabulary(texts: list[str], size: int = 2000) -> list[str]:
    """The reference's `size` most frequent words of four letters or more that are not English
    stop words: what its documents are about."""
    stops = stop_words("en")
    counts = Counter(w for t in texts for w in TOPIC_WORD.findall(t.lower()) if w not in stops)
    return sorted(w for w, _ in counts.most_common(size))


def topic_share(text: str, vocab: set[str]) -> float:
    words = TOPIC_WORD.findall(text.lower())
    return sum(w in vocab for w in words) / len(words) if words else 0.0


def match_lengths(pos: list[str], neg: list[str], rng: np.random.Generator, bins: int = 10) -> list[str]:
    """Negatives drawn so that their word counts follow the positives' distribution: as many
    per positive length decile as there are positives in it (fewer where the crawl has too
    few of that length). Without it, a classifier can learn "long = good"."""
    if not pos or not neg:
        return neg
    plen = np.log1p([len(t.split()) for t in pos])
    nlen = np.log1p([len(t.split()) for t in neg])
    edges = np.unique(np.quantile(plen, np.linspace(0, 1, bins + 1)[1:-1]))
    pbin, nbin = np.searchsorted(edges, plen, side="right"), np.searchsorted(edges, nlen, side="right")
    inside = (nlen >= plen.min()) & (nlen <= plen.max())  # nothing shorter or longer than every positive
    want = np.bincount(pbin, minlength=len(edges) + 1)
    chosen: list[int] = []
    for b, k in enumerate(want):
        pool = np.flatnonzero((nbin == b) & inside)
        if len(pool):
            chosen += rng.choice(pool, size=min(int(k), len(pool)), replace=False).tolist()
    return [neg[i] for i in sorted(chosen)]


def topicality(scores: np.ndarray, lengths: np.ndarray, topics: np.ndarray, limit: float = 0.5) -> dict[str, Any]:
    """How far the crawl's scores follow length and the reference's topic (Spearman)."""
    from scipy.stats import spearmanr

    if len(scores) < 3 or np.ptp(scores) == 0:
        return {"docs": int(len(scores)), "spearman_length": None, "spearman_reference_topic": None, "warning": None}
    rho_len = float(spearmanr(scores, lengths).statistic) if np.ptp(lengths) else 0.0
    rho_topic = float(spearmanr(scores, topics).statistic) if np.ptp(topics) else 0.0
    warn = []
    if abs(rho_len) >= limit:
        warn.append(f"scores follow document length (Spearman {rho_len:.2f})")
    if rho_topic >= limit:
        warn.append(f"scores follow the reference's topic (Spearman {rho_topic:.2f}): the classifier keeps on-topic pages, "
                    "not well-written ones; add general prose to the reference sources")
    return {"docs": int(len(scores)), "spearman_length": round(rho_len, 4), "spearman_reference_topic": round(rho_topic, 4),
            "warning": "; ".join(warn) or None}


# ------------------------------------------------------------------------ the stage
def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path]) -> dict:
    from tasks.lib.executor import Executor

    q, c, ex = params.quality, params.quality.classifier, params.executor
    roles = {s.name: s.role for s in params.collect.sources}
    shards = [(name, roles[name], f) for name, folder in source_folders(inputs["raw"]).items() if name in roles for f in shard_files(folder)]
    count = Counter()
    for name, role, f in shards:
        count[role] += shard_rows(f)
    metrics: dict[str, Any] = {"sources": {}}
    with atomic_dir(outputs["quality_model"]) as model_dir, atomic_dir(outputs["filtered"]) as kept_dir, \
            atomic_dir(outputs["dropped"]) as drop_dir, Executor(ex.kind, ex.workers, ex.ray_address, desc="quality") as pool:

        def task(i, name, role, f, fraction=1.0, model=None):
            return ShardTask(i, name, role, str(f), str(kept_dir / name / f.name), str(drop_dir / name / f.name) if q.write_dropped else None,
                             model, q, params.seed, fraction, False)

        model_path = None
        if c.enabled:
            # 1. the training sample: positives up to max_train_docs, as many negatives (GPT-3)
            kept_share = 1 - c.holdout_fraction
            n_pos = min(count["reference"] * kept_share, c.max_train_docs)
            frac = {"reference": n_pos / max(count["reference"] * kept_share, 1), "crawl": n_pos / max(count["crawl"] * kept_share, 1)}
            train_tasks = [(role, task(i, n, role, f, min(frac[role], 1.0))) for i, (n, role, f) in enumerate(shards) if role in frac]
            got = pool.map(training_texts, [t for _, t in train_tasks])
            pos = [t for (role, _), texts in zip(train_tasks, got) if role == "reference" for t in texts]
            crawl = [t for (role, _), texts in zip(train_tasks, got) if role == "crawl" for t in texts]
            neg = match_lengths(pos, crawl, np.random.default_rng([params.seed, 7])) if c.match_length else crawl
            model_path = model_dir / "model.bin"
            train_classifier(pos, neg, c, params.seed, model_path)
            write_json(model_dir / "vocab.json", reference_vocabulary(pos))
            metrics["classifier"] = {"train_docs": len(pos) + len(neg), "train_positives": len(pos), "train_negatives": len(neg),
                                     "crawl_sample": len(crawl)}
            if c.keep_rule == "fraction":  # DCLM: keep the crawl's top share by score
                import fasttext

                sample = hq_scores(fasttext.load_model(str(model_path)), crawl)
                threshold = float(np.quantile(sample, 1 - c.keep_fraction)) if len(sample) else 1.0
                metrics["classifier"]["fraction_threshold"] = threshold
                q = q.model_copy(update={"classifier": c.model_copy(update={"threshold": threshold})})
        write_json(model_dir / "labels.json", {"positive": HQ, "negative": LQ, "max_chars": c.max_chars, "enabled": c.enabled})
        # 2. filter every shard
        results = pool.map(filter_shard, [task(i, n, role, f, model=str(model_path) if model_path else None) for i, (n, role, f) in enumerate(shards)])
        if c.enabled:
            held = pool.map(holdout_scores, [task(i, n, role, f, model=str(model_path)) for i, (n, role, f) in enumerate(shards) if role in ("reference", "crawl")])
            scores = np.array([s for h in held for s in h[0]])
            labels = np.array([lab for h in held for lab in h[1]], dtype=int)
            metrics["classifier"].update(precision_recall(scores >= q.classifier.threshold, labels == 1), auc=auc(scores, labels),
                                         heldout_docs=len(labels))
            rows = np.array([row for r in results for row in r["topic_rows"]], dtype=np.float64).reshape(-1, 3)
            metrics["classifier"]["topicality"] = topicality(rows[:, 0], rows[:, 1], rows[:, 2])
            if metrics["classifier"]["topicality"]["warning"]:
                log.warning("quality classifier: %s", metrics["classifier"]["topicality"]["warning"])
        for name in sorted({n for n, _, _ in shards}):  # a source whose every document was dropped still has its folder
            (kept_dir / name).mkdir(parents=True, exist_ok=True)
            if q.write_dropped:
                (drop_dir / name).mkdir(parents=True, exist_ok=True)
    hist = np.zeros(10, dtype=np.int64)
    truth, lines, skipped, by_language = Counter(), Counter(), Counter(), Counter()
    for (name, role, _), r in zip(shards, results):
        skipped.update(r["rules_skipped"])
        by_language.update(r["by_language"])
        s = metrics["sources"].setdefault(name, {"docs_in": 0, "kept": 0, "dropped": Counter(), "lines_removed": Counter(),
                                                 "classified": c.enabled and role in c.apply_to_roles})
        s["docs_in"] += r["docs"]
        s["kept"] += r["kept"]
        s["dropped"].update(r["reasons"])
        s["lines_removed"].update(r["lines_removed"])
        lines.update(r["lines_removed"])
        hist += np.array(r["hist"])
        truth.update(r["truth_pred"])
    for s in metrics["sources"].values():
        s["dropped"], s["lines_removed"] = dict(sorted(s["dropped"].items())), dict(sorted(s["lines_removed"].items()))
    metrics["docs_in"] = sum(s["docs_in"] for s in metrics["sources"].values())
    metrics["kept"] = sum(s["kept"] for s in metrics["sources"].values())
    metrics["lines_removed"] = dict(sorted(lines.items()))
    # per identified language: documents kept and dropped (by reason); rules skipped for a language
    langs: dict[str, dict[str, int]] = {}
    for key, count in sorted(by_language.items()):
        lang, _, outcome = key.partition(":")
        langs.setdefault(lang, {})[outcome] = count
    metrics["languages"] = langs
    metrics["rules_skipped"] = dict(sorted(skipped.items()))
    if c.enabled:
        metrics["score_histogram"] = {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": int(h) for i, h in enumerate(hist)}
    if truth:
        tp, fp, fn = truth.get("True:True", 0), truth.get("False:True", 0), truth.get("True:False", 0)
        metrics["vs_ground_truth"] = {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "support": tp + fn}
    return metrics


if __name__ == "__main__":
    from tasks.stage import main

    raise SystemExit(main(sys.modules[__name__]))
