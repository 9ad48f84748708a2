"""quality: each rule on literal documents, the fastText classifier, the stage's bookkeeping."""

import json

import numpy as np
import pytest

from tasks import collect, quality, sources
from tasks.lib.errors import StageError
from tasks.lib.storage import read_docs, read_shard_table
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
    # GPT-3's sample of the crawl (not length-matched: on 420 documents that leaves the
    # classifier too few negatives to beat chance; match_length has tests of its own)
    q = tiny_params.quality
    q = q.model_copy(update={"classifier": q.classifier.model_copy(update={"match_length": False})})
    m = run_stage(quality, tiny_params.model_copy(update={"quality": q}))
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
    c = m["classifier"]
    assert c["train_docs"] == c["train_positives"] + c["train_negatives"] and c["train_positives"] > 0 < c["train_negatives"]
    assert json.loads((workdir / "models/quality/labels.json").read_text()) == {
        "positive": quality.HQ, "negative": quality.LQ, "max_chars": q.classifier.max_chars, "enabled": True}
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


# ---------------------------------------------------------------- languages (issue 21)
GERMAN = (
    "Das Modul json wandelt Objekte von Python in Text im Format JSON um und liest solchen Text "
    "wieder ein. Mit der Funktion dumps entsteht eine Zeichenkette, mit loads wird sie gelesen. "
    "Die Schlüssel eines Wörterbuchs müssen Zeichenketten sein, und Zahlen mit Nachkommastellen "
    "werden so genau geschrieben, dass sie ohne Verlust zurückgelesen werden können.\n"
    "Ein Fehler beim Lesen nennt die Zeile und die Spalte, an der das Problem auftritt, damit es "
    "sich schnell finden lässt. Eigene Typen lassen sich über eine Funktion für den Standardfall unterstützen."
)
FINNISH = (
    "Moduuli json muuntaa Pythonin olioita JSON-tekstiksi ja lukee tekstin takaisin olioiksi. "
    "Funktiolla dumps saadaan merkkijono ja funktiolla loads se luetaan. Sanakirjan avainten täytyy "
    "olla merkkijonoja, ja liukuluvut kirjoitetaan niin tarkasti, että ne voidaan lukea takaisin ilman "
    "häviötä. Virheilmoitus kertoo rivin ja sarakkeen, jossa ongelma on, joten se löytyy nopeasti.\n"
    "Omia tyyppejä voidaan tukea antamalla oletusfunktio, joka muuntaa ne tuetuiksi arvoiksi."
)
CHINESE = (
    "json 模块把 Python 对象编码成 JSON 文本，也能把 JSON 文本解码回 Python 对象。使用 dumps 可以得到一个字符串，"
    "使用 loads 可以解析字符串。字典的键必须是字符串，浮点数会写出足够的位数，以便准确地读回。\n"
    "解析出错时会抛出异常，并报告问题所在的行和列，方便快速找到错误的位置。自定义类型可以通过默认函数来支持。"
)


@pytest.mark.parametrize("backend", ["fasttext", "langid"])
def test_both_identifiers_are_offline_and_tell_languages_apart(backend):
    from tasks.lib.languages import identify

    got = [lang for lang, _ in identify([GOOD, GERMAN, FINNISH, CHINESE, "Модуль json кодирует объекты Python в текст JSON и обратно."],
                                        1000, backend)]
    assert got == ["en", "de", "fi", "zh", "ru"]


def test_rules_use_the_documents_language():
    from collections import Counter

    rules = cfg("quality.rules")
    # German prose has none of Gopher's English stop words: dropped as English, kept as German
    assert quality.rule_filter(GERMAN, rules, lang="en") == (False, "few_stop_words")
    assert quality.rule_filter(GERMAN, rules, lang="de") == (True, None)
    assert quality.rule_filter(GERMAN, rules) == (False, "few_stop_words")  # language ID off: English lists, as before
    # no stop-word list for Finnish: the rule is skipped for it, and counted
    skipped = Counter()
    assert quality.rule_filter(FINNISH, rules, lang="fi", skipped=skipped) == (True, None)
    assert skipped == {"few_stop_words:fi": 1}
    # Chinese has no spaces: 3 whitespace "words", but about 110 estimated from its letters
    assert len(CHINESE.split()) < rules.min_words
    skipped = Counter()
    assert quality.rule_filter(CHINESE, rules, lang="zh", skipped=skipped) == (True, None)
    assert skipped == {"mean_word_length:zh": 1, "few_stop_words:zh": 1, "top_2gram:zh": 1, "duplicate_5grams:zh": 1}
    assert quality.rule_filter(CHINESE[:40], rules, lang="zh") == (False, "too_few_words")
    assert quality.rule_filter(CHINESE, rules, lang="en") == (False, "too_few_words")  # what it did before


def test_a_multilingual_crawl_keeps_good_pages_in_every_listed_language(workdir):
    from tasks.config import parse_params

    pages = [("en", GOOD), ("de", GERMAN), ("fi", FINNISH), ("zh", CHINESE)]
    rows = [{"id": f"{lang}-{i}", "text": text.replace("json", f"json{i}")} for i in range(3) for lang, text in pages]
    rows.append({"id": "de-spam", "text": "kaufen kaufen kaufen jetzt billig " * 20})
    (workdir / "crawl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    raw = tiny_raw_params()
    raw["collect"]["sources"] = [{"name": "multi", "kind": "files", "role": "crawl", "globs": ["crawl.jsonl"], "id_field": "id"}]
    raw["mix"]["weights"] = {"multi": 1.0}
    raw["quality"]["classifier"]["enabled"] = False
    raw["quality"]["lines"]["roles"] = []
    raw["quality"]["language"].update(languages=["en", "de", "zh"])
    params = parse_params(raw)
    for stage in (sources, collect):
        run_stage(stage, params)
    m = run_stage(quality, params)
    kept = sorted(r["id"] for r in read_docs(workdir / "data/filtered/multi"))
    assert kept == sorted(f"multi/{lang}-{i}" for i in range(3) for lang in ("en", "de", "zh"))
    assert m["languages"]["de"] == {"kept": 3, "few_stop_words": 1}  # the spam page has none of the German stop words
    assert m["languages"]["fi"] == {"language": 3}  # not listed: dropped by language before any rule
    assert m["languages"]["zh"] == {"kept": 3}
    assert m["rules_skipped"]["few_stop_words:zh"] == 3
    assert m["sources"]["multi"]["dropped"]["language"] == 3


def test_negatives_follow_the_positives_lengths():
    words = lambda n, tag: " ".join(f"{tag}{i}" for i in range(n))  # noqa: E731
    pos = [words(10, "p")] * 5 + [words(100, "p")] * 5
    neg = [words(10, "a")] * 20 + [words(100, "b")] * 3 + [words(1000, "c")] * 20
    got = quality.match_lengths(pos, neg, np.random.default_rng(0))
    lengths = sorted(len(t.split()) for t in got)
    assert lengths == [10] * 5 + [100] * 3  # five short as five short positives; all three of 100 (five wanted); none longer than any positive


def test_topicality_warns_when_scores_follow_length_or_topic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 200)
    topics = rng.random(200)
    noise = rng.random(200)
    quiet = quality.topicality(noise, lengths, topics)
    assert quiet["warning"] is None and abs(quiet["spearman_length"]) < 0.3
    long = quality.topicality(lengths / 1000 + 0.01 * noise, lengths, topics)
    assert long["spearman_length"] > 0.95 and "length" in long["warning"]
    on_topic = quality.topicality(topics, lengths, topics)
    assert on_topic["spearman_reference_topic"] == 1.0 and "topic" in on_topic["warning"]
    vocab = set(quality.reference_vocabulary(["The parser reads tokens; the parser builds trees.", "Tokens and trees."], size=3))
    assert vocab == {"parser", "tokens", "trees"}  # "reads", "builds" appear once; "the", "and" are short
    assert quality.topic_share("a parser sorts tokens", vocab) == pytest.approx(2 / 3)  # parser, sorts, tokens: words of 4+ letters


def test_keep_fraction_keeps_the_crawl_top_share(workdir, tiny_params):
    run_stage(sources, tiny_params)
    run_stage(collect, tiny_params)
    c = tiny_params.quality.classifier
    m = {}
    for frac in (1.0, 0.3):
        q = tiny_params.quality.model_copy(update={"classifier": c.model_copy(update={"keep_rule": "fraction", "keep_fraction": frac})})
        m[frac] = run_stage(quality, tiny_params.model_copy(update={"quality": q}))
    t = m[0.3]["classifier"]["fraction_threshold"]
    kept = [json.loads(r["meta"])["quality_score"] for r in read_docs(workdir / "data/filtered/web_crawl")]  # of the 0.3 run
    assert kept and min(kept) >= t
    assert 0.0 < t < 1.0 and m[1.0]["classifier"]["fraction_threshold"] < t
    assert "classifier" not in m[1.0]["sources"]["web_crawl"]["dropped"]  # the whole crawl passes at 100%
    assert m[0.3]["sources"]["web_crawl"]["dropped"].get("classifier", 0) > 0
    topical = m[0.3]["classifier"]["topicality"]
    # measured on the held-out pages the classifier decided on: kept, or dropped by it (recounted from the outputs)
    decided = [r["id"] for name in ("web_crawl", "web_archive") for r in read_docs(workdir / "data/filtered" / name)]
    decided += [r["id"] for name in ("web_crawl", "web_archive") for r in read_docs(workdir / "data/dropped" / name)
                if json.loads(r["meta"])["drop_reason"] == "classifier"]
    held = sum(quality.in_holdout(d, c.holdout_fraction) for d in decided)
    assert topical["docs"] == held > 10 and topical["spearman_length"] is not None


def test_duplicate_5gram_share_and_boilerplate_share_by_hand():
    loose = dict(min_words=1, min_stop_words=0, min_punct_line_fraction=0.0, max_top_2gram_fraction=1.0,
                 min_alpha_word_fraction=0.0, max_duplicate_line_fraction=1.0)
    # the 5-gram "alpha .. epsilon" twice: its 10 words are covered, "zz" is not: 52 of 54 characters
    # (punctuation stripped, so "epsilon." is "epsilon")
    text = "alpha beta gamma delta epsilon. alpha beta gamma delta epsilon zz"
    assert quality.rule_filter(text, cfg("quality.rules", **loose, max_duplicate_5gram_fraction=0.97)) == (True, None)
    assert quality.rule_filter(text, cfg("quality.rules", **loose, max_duplicate_5gram_fraction=0.96)) == (False, "duplicate_5grams")
    # one boilerplate line of 4: a share of 0.25
    lines = "A first line of prose.\nOur cookie notice is here.\nA third line of prose.\nA fourth line of prose."
    pattern = quality.phrase_pattern(["cookie"])
    assert quality.rule_filter(lines, cfg("quality.rules", **loose, max_boilerplate_line_fraction=0.25), pattern) == (True, None)
    assert quality.rule_filter(lines, cfg("quality.rules", **loose, max_boilerplate_line_fraction=0.24), pattern) == (False, "boilerplate")


def test_fasttext_input_and_topicality_of_too_few_documents_by_hand():
    assert quality.ft_text("Ab  C\nd e", 8) == "ab c d"  # cut to 8 characters, lower-cased, one line
    assert quality.topicality(np.array([0.5]), np.array([3.0]), np.array([0.1])) == {
        "docs": 1, "spearman_length": None, "spearman_reference_topic": None, "warning": None}


def test_gpt3_pareto_rule_keeps_a_page_when_its_draw_beats_one_minus_its_score(workdir, tiny_params):
    """keep_rule pareto, recomputed here: one Lomax draw per scored page from the shard's own
    stream, kept when draw > 1 - score (GPT-3, appendix A); the threshold rule decides otherwise."""
    run_stage(sources, tiny_params)
    run_stage(collect, tiny_params)
    run_stage(quality, tiny_params)  # trains the classifier this test reuses
    c = tiny_params.quality.classifier.model_copy(update={"keep_rule": "pareto", "pareto_alpha": 2.0})
    q = tiny_params.quality.model_copy(update={"classifier": c})
    shard = sorted((workdir / tiny_params.paths.raw / "web_crawl").glob("*.parquet"))[0]
    out = workdir / "pareto"
    task = quality.ShardTask(7, "web_crawl", "crawl", str(shard), str(out / "kept.parquet"), str(out / "dropped.parquet"),
                             str(workdir / "models/quality/model.bin"), q, 3, 1.0, False)
    m = quality.filter_shard(task)
    ids = read_shard_table(shard, ["id"]).column("id").to_pylist()
    kept, dropped = ({r["id"]: json.loads(r["meta"]) for r in read_shard_table(out / f, ["id", "meta"]).to_pylist()}
                     for f in ("kept.parquet", "dropped.parquet"))
    assert len(ids) == len(kept) + len(dropped) == m["docs"]
    draws = np.random.default_rng([3, 7]).pareto(2.0, len(ids))  # every page scored: one draw each, in order
    decided = by_draw = by_threshold = 0
    for doc_id, draw in zip(ids, draws):
        meta = kept.get(doc_id) or dropped[doc_id]
        if meta.get("drop_reason", "classifier") != "classifier":
            continue  # a rule dropped it before the classifier was asked
        s = meta["quality_score"]
        if abs(draw - (1 - s)) < 1e-5:
            continue  # the stored score is rounded to 6 places: too close to call
        decided += 1
        assert (doc_id in kept) == (draw > 1 - s), (doc_id, s, draw)
        by_draw += draw > 1 - s
        by_threshold += s >= c.threshold
    assert decided > 20 and 0 < by_draw < decided and by_draw != by_threshold  # both outcomes, and not the threshold rule's
