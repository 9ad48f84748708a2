"""dedup: planted exact and near duplicates are found, distinct documents are kept."""

import json

from tasks import collect, dedup, quality
from tasks.config import Dedup
from tasks.storage import doc_row, read_docs, write_docs
from tests.conftest import run_stage

BASE = " ".join(f"token{i} is word number {i} of a long and distinctive document" for i in range(60))
OTHER = " ".join(f"unrelated{i} sentence about another subject entirely {i * 7}" for i in range(60))


def edit(text, every=40):
    words = text.split()
    return " ".join(w.upper() if i % every == 0 else w for i, w in enumerate(words))


def test_planted_near_duplicate_found_distinct_kept():
    texts = [BASE, edit(BASE), OTHER, BASE.replace("token", "TOKEN"), BASE + " Footer: all rights reserved."]
    cluster, found = dedup.find_clusters(texts, Dedup(), seed=1)
    assert cluster[0] == cluster[1] == cluster[3] == cluster[4]
    assert cluster[2] != cluster[0]
    assert found["exact_pairs"] >= 2  # case-only changes are exact after normalisation


def test_threshold_matters():
    heavy = " ".join(w if i % 3 else "x" for i, w in enumerate(BASE.split()))  # a third of words replaced
    cluster, _ = dedup.find_clusters([BASE, heavy], Dedup(threshold=0.9), seed=1)
    assert cluster[0] != cluster[1]


def test_stage_keeps_reference_copy_across_sources(workdir, tiny_params):
    params = tiny_params
    write_docs(workdir / "data/filtered/python_docs", [doc_row("python_docs/a", "python_docs", BASE)])
    write_docs(workdir / "data/filtered/web_crawl", [
        doc_row("web_crawl/p1", "web_crawl", edit(BASE) + " extra words here", {"duplicate_of": "python_docs/a"}),
        doc_row("web_crawl/p2", "web_crawl", OTHER),
    ])
    write_docs(workdir / "data/filtered/python_code", [doc_row("python_code/c", "python_code", "def f():\n    return 1\n")])
    m = dedup.run(params, {"filtered": workdir / "data/filtered"}, {"dedup": workdir / "data/dedup"})
    assert [r["id"] for r in read_docs(workdir / "data/dedup/python_docs")] == ["python_docs/a"]
    assert [r["id"] for r in read_docs(workdir / "data/dedup/web_crawl")] == ["web_crawl/p2"]
    assert m["sources"]["web_crawl"]["near_removed"] == 1
    assert m["vs_ground_truth"]["precision"] == 1.0 and m["vs_ground_truth"]["recall"] == 1.0
    samples = json.loads((workdir / "reports/dedup_clusters.json").read_text())
    assert len(samples) == 1 and {d["id"] for d in samples[0]} == {"python_docs/a", "web_crawl/p1"}


def test_pairwise_scores_hand_made():
    s = dedup.pairwise_scores([0, 0, 0, 3], ["a", "a", "b", "b"])
    assert s["predicted_pairs"] == 3 and s["true_pairs"] == 2
    assert s["precision"] == 1 / 3 and s["recall"] == 1 / 2


def test_stage_on_generated_crawl_scores_well(workdir, tiny_params):
    for stage in (collect, quality):
        run_stage(stage, tiny_params)
    m = run_stage(dedup, tiny_params)
    assert m["kept"] < m["docs_in"]
    assert m["vs_ground_truth"]["recall"] > 0.9 and m["vs_ground_truth"]["precision"] > 0.9
