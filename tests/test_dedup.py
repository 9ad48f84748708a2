"""dedup: planted exact and near duplicates are found, distinct documents kept, the original
kept over a copy with boilerplate appended, chains of weak links cut, work linear in the
size of a cluster, and precision/recall on the generated crawl."""

import json
import random

import numpy as np
import pyarrow as pa

from tasks import collect, dedup, quality, sources
from tasks.lib.storage import doc_row, read_docs, write_docs
from tests.conftest import cfg, run_stage

BASE = " ".join(f"token{i} is word number {i} of a long and distinctive document" for i in range(60))
OTHER = " ".join(f"unrelated{i} sentence about another subject entirely {i * 7}" for i in range(60))


def edit(text, every=40):
    words = text.split()
    return " ".join(w.upper() + "x" if i % every == 0 else w for i, w in enumerate(words))


def clusters(texts, c=None, seed=1, roles=None):
    """Cluster labels and kept index per text, through the stage's own functions."""
    c = c or cfg("dedup")
    sig, keys, exact, nwords = dedup.sketch(pa.array(texts), c.shingle_words, c.num_perm, c.bands, c.rows, seed)
    labels, found = dedup.find_clusters(sig, keys, exact, c.threshold, c.verify)
    words = [" ".join(t.lower().split()) for t in texts]

    def prefix_of(req):  # what the stage computes from the shards
        import xxhash

        from tasks.lib import minhash as mh

        norm = mh.normalised_words(pa.array(texts)).to_pylist()
        return {i: xxhash.xxh3_128_intdigest(" ".join(norm[i][:n]).encode()) for i, n in req.items()}

    keep = dedup.choose_keep(labels, np.array(roles or [0] * len(texts)), nwords, exact, prefix_of)
    del words
    return labels, keep, found


def test_planted_near_duplicate_found_distinct_kept():
    texts = [BASE, edit(BASE), OTHER, BASE.replace("token", "TOKEN"), BASE + " Footer: all rights reserved."]
    labels, _, found = clusters(texts)
    assert labels[0] == labels[1] == labels[3] == labels[4]
    assert labels[2] != labels[0]
    assert found["exact_pairs"] == 1  # case-only changes are exact after normalisation


def test_threshold_matters():
    heavy = " ".join(w if i % 3 else "x" for i, w in enumerate(BASE.split()))  # a third of words replaced
    labels, _, _ = clusters([BASE, heavy], cfg("dedup", threshold=0.9))
    assert labels[0] != labels[1]


def test_the_original_beats_the_copy_with_boilerplate_appended():
    footer = " Copyright 2024 pyweekly. All rights reserved. Privacy Policy | Terms of Use | Cookie Settings"
    texts = [BASE + footer, BASE, BASE + footer + " Share this: Facebook Twitter"]
    labels, keep, _ = clusters(texts)
    assert labels[0] == labels[1] == labels[2]
    assert keep[int(labels[1])] == 1  # not the longest, not the first: the one the others extend
    # with a better role, the copy wins anyway (reference before crawl)
    _, keep2, _ = clusters(texts, roles=[0, 3, 3])
    assert keep2[int(labels[0])] == 0


def test_a_chain_of_weak_links_does_not_merge_documents_that_share_nothing(workdir, tiny_params):
    rng = random.Random(0)
    words = [f"w{rng.randrange(10**9)}" for _ in range(400)]
    # each document shifts a 200-word window by 20 words: neighbours are near-duplicates,
    # the two ends share nothing
    chain = [" ".join(words[i * 20 : i * 20 + 200]) for i in range(11)]
    write_docs(workdir / "data/filtered/web_crawl", [doc_row(f"web_crawl/d{i}", "web_crawl", t) for i, t in enumerate(chain)])
    for name in ("python_docs", "python_code"):
        write_docs(workdir / f"data/filtered/{name}", [])
    params = tiny_params.model_copy(update={"dedup": cfg("dedup", threshold=0.6)})
    m = run_stage(dedup, params)
    kept = [r["id"] for r in read_docs(workdir / "data/dedup/web_crawl")]
    assert "web_crawl/d0" in kept and "web_crawl/d10" in kept, "the ends of the chain share nothing: both stay"
    assert m["released_by_chaining_guard"] > 0


def test_work_grows_linearly_with_the_size_of_a_cluster():
    counts = {}
    for k in (50, 200):
        texts = [BASE + f" copy {i}" for i in range(k)]
        labels, _, found = clusters(texts)
        assert len(set(labels.tolist())) == 1
        counts[k] = found["candidate_pairs"]
    c = cfg("dedup")
    assert counts[200] <= c.bands * (200 - 1)  # each member is compared with its bucket's first, never all pairs
    assert counts[200] / counts[50] < 200 / 50 * 1.1


def test_stage_keeps_reference_copy_across_sources(workdir, tiny_params):
    params = tiny_params
    write_docs(workdir / "data/filtered/python_docs", [doc_row("python_docs/a", "python_docs", BASE)])
    write_docs(workdir / "data/filtered/web_crawl", [
        doc_row("web_crawl/p1", "web_crawl", edit(BASE) + " extra words here", {"duplicate_of": "python_docs/a"}),
        doc_row("web_crawl/p2", "web_crawl", OTHER),
    ])
    write_docs(workdir / "data/filtered/python_code", [doc_row("python_code/c", "python_code", "def f():\n    return 1\n")])
    m = dedup.run(params, {"filtered": workdir / "data/filtered"}, {"dedup": workdir / "data/dedup", "report": workdir / "reports/dedup"})
    assert [r["id"] for r in read_docs(workdir / "data/dedup/python_docs")] == ["python_docs/a"]
    assert [r["id"] for r in read_docs(workdir / "data/dedup/web_crawl")] == ["web_crawl/p2"]
    assert m["sources"]["web_crawl"]["near_removed"] == 1
    assert m["vs_ground_truth"]["precision"] == 1.0 and m["vs_ground_truth"]["recall"] == 1.0
    samples = json.loads((workdir / "reports/dedup/clusters.json").read_text())
    assert len(samples) == 1 and {d["id"] for d in samples[0]} == {"python_docs/a", "web_crawl/p1"}
    meta = json.loads(read_docs(workdir / "data/dedup/python_docs")[0]["meta"])
    assert meta["dedup_cluster_size"] == 2


def test_pairwise_scores_hand_made():
    s = dedup.pairwise_scores([0, 0, 0, 3], ["a", "a", "b", "b"])
    assert s["predicted_pairs"] == 3 and s["true_pairs"] == 2
    assert s["precision"] == 1 / 3 and s["recall"] == 1 / 2
    # unordered labels (as the stage has them: kept index and a 64-bit hash of the true original)
    s = dedup.pairwise_scores(np.array([5, 1, 5, 1, 5, 5]), np.array([9, 9, 8, 8, 9, 9], dtype=np.uint64))
    assert (s["predicted_pairs"], s["true_pairs"]) == (7, 7)
    assert s["precision"] == 3 / 7 and s["recall"] == 3 / 7  # true pairs: documents 0, 4, 5


def test_sharded_rows_read_rows_and_columns_across_shard_files(tmp_path):
    parts = [np.arange(8).reshape(2, 4), np.zeros((0, 4), dtype=np.int64), 100 + np.arange(12).reshape(3, 4)]
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"sig-{i}.npy")
        np.save(files[-1], p)
    whole = np.concatenate(parts)
    rows = dedup.ShardedRows(files, np.array([len(p) for p in parts]), 4, np.int64)
    assert rows.shape == (5, 4) and len(rows) == 5
    idx = np.array([4, 0, 2, 4, 1])
    assert (rows[idx] == whole[idx]).all()
    assert (rows[:, 2] == whole[:, 2]).all()


def test_bucket_edges_link_each_member_to_the_first():
    a, b = dedup.bucket_edges(np.array([7, 3, 7, 7, 3, 9], dtype=np.uint64))
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 3), (1, 4)]


def test_stage_on_generated_crawl_scores_well(workdir, tiny_params):
    for stage in (sources, collect, quality):
        run_stage(stage, tiny_params)
    m = run_stage(dedup, tiny_params)
    assert m["kept"] < m["docs_in"]
    assert m["vs_ground_truth"]["recall"] > 0.9 and m["vs_ground_truth"]["precision"] > 0.9
