"""Quality-stage speed per step, one core: line cleaning, language ID (langid.py, the earlier
default, against fastText's lid.176, the default now) and the document rules, on the same
documents, with MB/s per step and for the whole per-document pass.

    python bench/quality_speed.py --docs 3000

The documents are the built-in generated crawl (pages of real documentation text inside page
chrome, boilerplate, spam and junk pages), as the quality stage sees them. Language ID reads
the first `quality.language.max_chars` characters of each line-cleaned page; the rules run
with the identified language, as the stage runs them (the boilerplate rule skipped on
line-cleaned text) and with the boilerplate rule run (before); the count of words with a
letter is timed both ways. The baseline pass (langid.py, every rule) is measured in the same
run; the ratio is printed. The classifier (fastText) is timed on the same pages when the
stage's model is there (`--model`, after a pipeline run); it is the same in both passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import quality  # noqa: E402
from tasks.config import parse_params  # noqa: E402
from tasks.lib import corpora  # noqa: E402
from tasks.lib.languages import identify  # noqa: E402


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/quality/model.bin", help="the quality stage's classifier (after a run); timed when present")
    args = ap.parse_args()
    params = parse_params(yaml.safe_load(Path(args.params).read_text()))
    q = params.quality
    crawl = next(s for s in params.collect.sources if s.kind == "builtin" and s.corpus == "synthetic_crawl")
    texts = [t for _, t, _ in corpora.synthetic_crawl(args.docs, crawl.crawl_mix.model_dump(), params.seed)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    pattern = quality.phrase_pattern(q.rules.boilerplate_phrases)
    identify(["warm up"], 100, "fasttext"), identify(["warm up"], 100, "langid")  # load both models outside the timing

    cleaned, t_lines = timed(lambda: [quality.clean_lines(t, q.lines, pattern)[0] for t in texts])
    by_langid, t_langid = timed(identify, cleaned, q.language.max_chars, "langid")
    by_fasttext, t_fasttext = timed(identify, cleaned, q.language.max_chars, "fasttext")
    # as the stage: the boilerplate rule is not run on line-cleaned text (it has nothing left to count)
    _, t_rules = timed(lambda: [quality.rule_filter(c, q.rules, None, lang) for c, (lang, _) in zip(cleaned, by_fasttext)])
    _, t_rules_all = timed(lambda: [quality.rule_filter(c, q.rules, pattern, lang) for c, (lang, _) in zip(cleaned, by_fasttext)])
    t_classifier = None
    if Path(args.model).is_file():
        import fasttext

        clf = fasttext.load_model(args.model)
        _, t_classifier = timed(lambda: quality.hq_scores(clf, [quality.ft_text(c, q.classifier.max_chars) for c in cleaned]))
    words = [c.split() for c in cleaned]
    gen_counts, t_gen = timed(lambda: [sum(any(ch.isalpha() for ch in w) for w in ws) for ws in words])
    re_counts, t_re = timed(lambda: [quality.letter_words(c, len(ws)) for c, ws in zip(cleaned, words)])
    assert gen_counts == re_counts

    print(f"{len(texts)} documents, {mb:.2f} MB, one core")
    for name, t in (("line cleaning", t_lines), ("language ID: langid.py (baseline)", t_langid),
                    ("language ID: fastText lid.176", t_fasttext), ("rules, boilerplate rule run (before)", t_rules_all),
                    ("rules, as the stage runs them", t_rules), ("classifier (fastText)", t_classifier)):
        if t is None:
            print(f"  {name:36s} not timed: no model at {args.model} (run the pipeline first)")
            continue
        print(f"  {name:36s} {t:7.2f} s  {mb / t:7.2f} MB/s")
    print(f"  words with a letter: generator {t_gen:.2f} s, letter_words {t_re:.2f} s (x{t_gen / t_re:.1f}), same counts")
    before, after = t_lines + t_langid + t_rules_all, t_lines + t_fasttext + t_rules
    print(f"  per-document pass, langid.py   {before:7.2f} s  {mb / before:7.2f} MB/s")
    print(f"  per-document pass, fastText    {after:7.2f} s  {mb / after:7.2f} MB/s  (x{before / after:.2f})")
    if t_classifier is not None:  # the same classifier in both passes
        b, a = before + t_classifier, after + t_classifier
        print(f"  with the classifier: {mb / b:.2f} -> {mb / a:.2f} MB/s (x{b / a:.2f})")
    print(f"  language ID alone: fastText x{t_langid / t_fasttext:.1f} faster than langid.py")
    agree = sum(a[0] == b[0] for a, b in zip(by_langid, by_fasttext)) / len(texts)
    print(f"  the two identifiers agree on {agree:.1%} of pages; fastText: {dict(Counter(l for l, _ in by_fasttext).most_common(4))}")


if __name__ == "__main__":
    main()
