"""quality: each rule on literal documents, the fastText classifier, the stage's bookkeeping."""

import json

import numpy as np
import pytest

from tasks import collect, quality, sources
from tasks.lib.errors import StageError
from tasks.lib.storage import read_docs
from tests.conftest import cfg, run_stage, tiny_raw_params

GOOD = (
    "The json module encodes Python objects as JSON text and decodes JSON text back into "
    "Python objects. Use dumps to produce a string and loads to parse one. Keys of "
    "dictionaries must be strings, and floating point values are written with enough "
    "digits to be read back exactly. Custom types can be supported with a default hook.\n"
    "Errors raise a ValueError that reports the line and column of the problem."
)


@pytest.mark.parametrize("text, reason", [
    ("Loading...", "too_few_words"),
    ("supercalifragilisticexpialidociousness " * 40, "mean_word_length"),
    ("# ## ### #### " * 20 + GOOD, "symbol_ratio"),
    ("12 34 56 78 90 == -- ++ ** " * 10 + GOOD, "non_alpha_words"),
    ("\n".join(f"the home of the blog and contact pricing item {i}" for i in range(40)), "few_punct_lines"),
    ("\n".join(["Buy now and save money today."] * 20 + [GOOD]), "duplicate_lines"),
    ("cheap pills " * 60 + GOOD, "top_2gram"),
    (" ".join(["the quick brown fox jumps over the lazy dog again."] * 12) + " " + GOOD, "duplicate_5grams"),
    ("\n".join(["We use cookies. Accept our cookie policy.", "Privacy Policy and Terms of Use apply.",
                "Subscribe to our newsletter today.", "Click here for more."] + [GOOD]), "boilerplate"),
])
def test_rules_drop_what_they_should(text, reason):
    rules = cfg("quality.rules")
    assert quality.rule_filter(text, rules, quality.phrase_pattern(rules.boilerplate_phrases)) == (False, reason)


@pytest.mark.parametrize("text, reason", [
    (GOOD.replace(" the ", " a ").replace(" and ", " or ").replace(" to ", " for ").replace(" be ", " get ").replace(" of ", " in ")
     .replace("The ", "A ").replace(" with ", " by "), "few_stop_words"),
    ("\n".join(f"• item {i} of the list and more words here." for i in range(20)), "bullet_lines"),
    ("\n".join(f"The story of the day continues here and then {i}..." for i in range(10)), "ellipsis_lines"),
])
def test_the_gopher_rules_added(text, reason):
    assert quality.rule_filter(text, cfg("quality.rules")) == (False, reason)


def test_boilerplate_matches_whole_words_only():
    p = quality.phrase_pattern(["log in", "cookie"])
    assert p.search("Please Log In now") and p.search("cookie.")
    assert not p.search("See the changelog in the docs") and not p.search("cookies are baked")  # not 'log in', not 'cookie'


def test_lines_are_removed_not_pages():
    page = "Home | About | Blog\nWe use cookies to improve your experience.\n" + GOOD + "\nRead more\nSubscribe\nCopyright 2024. All rights reserved."
    lines = cfg("quality.lines")
    text, removed = quality.clean_lines(page, lines, quality.phrase_pattern(cfg("quality.rules").boilerplate_phrases))
    assert text == GOOD
    assert removed == {"menu_line": 1, "short_line": 1, "boilerplate_line": 3}


def test_language_id_is_offline_and_drops_other_languages(workdir, tiny_params):
    assert quality.language(GOOD, 1000)[0] == "en"
    assert quality.language("Модуль json кодирует объекты Python в текст JSON и обратно.", 1000)[0] == "ru"


def test_rules_keep_good_prose():
    assert quality.rule_filter(GOOD, cfg("quality.rules")) == (True, None)


def test_thresholds_come_from_params():
    assert quality.rule_filter(GOOD, cfg("quality.rules", min_words=500)) == (False, "too_few_words")


def test_classifier_separates_reference_from_crawl(tmp_path):
    rng = np.random.default_rng(0)
    prose = "module function returns value argument object class method parameter string list default".split()
    junk = "cheap free casino click win bonus login menu cookie subscribe home deal".split()
    make = lambda vocab, n: [" ".join(rng.choice(vocab, 40)) for _ in range(n)]
    pos, neg = make(prose, 200), make(junk, 200)
    quality.train_classifier(pos, neg, cfg("quality.classifier", min_count=1), 0, tmp_path / "m.bin")
    import fasttext

    model = fasttext.load_model(str(tmp_path / "m.bin"))
    held_pos, held_neg = make(prose, 50), make(junk, 50)
    scores = quality.hq_scores(model, held_pos + held_neg)
    labels = np.array([1] * 50 + [0] * 50)
    assert quality.auc(scores, labels) > 0.95
    assert scores[:50].mean() > 0.8 > 0.2 > scores[50:].mean()
    assert (tmp_path / "m.bin").stat().st_size > 0


def test_classifier_needs_both_classes(tmp_path):
    with pytest.raises(StageError, match="both a 'reference' and a 'crawl'"):
        quality.train_classifier(["a b c"], [], cfg("quality.classifier"), 0, tmp_path / "m.bin")


def test_auc_and_precision_recall_on_hand_made_inputs():
    assert quality.auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert quality.auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    # pairs: (0.9>0.3) (0.9>0.5) (0.4>0.3) (0.4<0.5), a tie (0.5=0.5) counts half: (4 - 1 + 0.5) / 6
    assert quality.auc(np.array([0.9, 0.4, 0.5, 0.3, 0.5]), np.array([1, 1, 1, 0, 0])) == pytest.approx(4.5 / 6)
    pr = quality.precision_recall(np.array([True, True, False, False]), np.array([True, False, True, False]))
    assert pr == {"precision": 0.5, "recall": 0.5, "support": 2}


def test_stage_counts_every_drop_and_writes_it_aside(workdir, tiny_params):
    run_stage(sources, tiny_params)
    run_stage(collect, tiny_params)
    m = run_stage(quality, tiny_params)
    for name, s in m["sources"].items():
        dropped = read_docs(workdir / "data/dropped" / name)
        assert s["docs_in"] == s["kept"] + sum(s["dropped"].values()) == s["kept"] + len(dropped)
        assert all(json.loads(r["meta"])["drop_reason"] in s["dropped"] for r in dropped)
    assert m["sources"]["python_code"]["dropped"] == {}  # code is not in the rules' or classifier's roles
    assert m["classifier"]["auc"] > 0.65  # clearly above chance even on 420 documents
    # against the generated crawl's ground truth, most of what is dropped is junk and all junk is dropped
    assert m["vs_ground_truth"]["recall"] > 0.9 and m["vs_ground_truth"]["precision"] > 0.6
    kept = read_docs(workdir / "data/filtered/web_crawl")
    assert all("quality_score" in json.loads(r["meta"]) for r in kept)
    assert (workdir / "models/quality/model.bin").is_file()
    assert m["lines_removed"]["boilerplate_line"] > 0 and m["sources"]["web_crawl"]["lines_removed"]
    assert all("Privacy Policy" not in r["text"] for r in kept)  # page chrome is gone from what is kept


def test_a_crawl_only_corpus_runs_with_the_classifier_off(workdir, tiny_params):
    raw = tiny_raw_params()
    raw["collect"]["sources"] = [s for s in raw["collect"]["sources"] if s["name"] == "web_crawl"]
    raw["mix"]["weights"] = {"web_crawl": 1.0}
    raw["quality"]["classifier"]["enabled"] = False
    from tasks.config import parse_params

    params = parse_params(raw)
    for stage in (sources, collect):
        run_stage(stage, params)
    m = run_stage(quality, params)
    assert "classifier" not in m and m["kept"] > 0
    assert m["vs_ground_truth"]["recall"] > 0.6
    assert not (workdir / "models/quality/model.bin").exists()
