"""dedup: planted exact and near duplicates are found, distinct documents kept, the original
kept over a copy with boilerplate appended, chains of weak links cut, work linear in the
size of a cluster, and precision/recall on the generated crawl."""

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from tasks import collect, dedup, quality, sources
from tasks.lib.errors import StageError
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

    def prefix_of(req):  # what the stage computes from the shards
        from tasks.lib import minhash as mh

        return dict(zip(req, mh.prefix_keys(pa.array([texts[i] for i in req]), list(req.values()))))

    keep = dedup.choose_keep(labels, np.array(roles or [0] * len(texts)), nwords, exact, prefix_of)
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


def shingle_set(text: str, k: int = 3) -> set[tuple[str, ...]]:
    w = text.split()
    return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_overlapping_windows_keep_no_two_near_duplicates(workdir, tiny_params):
    """A chain: each document shifts a 200-word window by 20 words, so neighbours are
    near-duplicates (exact Jaccard of 3-word shingles 0.82 at one step, 0.66 at two, 0.54 at
    three) while far windows share nothing. The released members are clustered again: no two
    kept windows are near-duplicates, every removed one has a kept near-duplicate, and the
    number kept is what a greedy keep with exact similarities gives (checked here in plain
    Python, independently of the stage's MinHash)."""
    rng = random.Random(0)
    words = [f"w{rng.randrange(10**9)}" for _ in range(1400)]
    chain = [" ".join(words[i * 20 : i * 20 + 200]) for i in range(61)]
    write_docs(workdir / "data/filtered/web_crawl", [doc_row(f"web_crawl/d{i}", "web_crawl", t) for i, t in enumerate(chain)])
    for name in ("python_docs", "python_code", "web_archive"):
        write_docs(workdir / f"data/filtered/{name}", [])
    threshold = 0.6
    params = tiny_params.model_copy(update={"dedup": cfg("dedup", threshold=threshold)})
    m = run_stage(dedup, params)
    kept = [int(r["id"].removeprefix("web_crawl/d")) for r in read_docs(workdir / "data/dedup/web_crawl")]
    sets = [shingle_set(t) for t in chain]
    margin = 0.1  # MinHash with 128 permutations estimates Jaccard within about +-0.05
    for i in kept:
        for j in kept:
            assert i == j or exact_jaccard(sets[i], sets[j]) < threshold + margin, f"kept d{i} and d{j} are near-duplicates"
    for i in set(range(len(chain))) - set(kept):
        assert max(exact_jaccard(sets[i], sets[j]) for j in kept) >= threshold - margin, f"d{i} removed without a kept near-duplicate"
    greedy, left = [], list(range(len(chain)))
    while left:
        lead = left.pop(0)
        greedy.append(lead)
        left = [j for j in left if exact_jaccard(sets[lead], sets[j]) < threshold]
    assert abs(len(kept) - len(greedy)) <= 4, (kept, greedy)  # 21 greedy; the guard alone would keep about 58
    assert 0 in kept and m["released_by_chaining_guard"] > 40 and m["reclustered_after_release"] > 25 and m["recluster_rounds"] > 5


def test_work_grows_linearly_with_the_size_of_a_cluster():
    counts = {}
    for k in (50, 200):
        texts = [BASE + f" copy {i}" for i in range(k)]
        labels, _, found = clusters(texts)
        assert len(set(labels.tolist())) == 1
        counts[k] = found["candidate_pairs"]
    c = cfg("dedup")
    assert counts[200] <= 2 * c.bands * (200 - 1)  # each member against its bucket's first and its predecessor, never all pairs
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


THIRD = " ".join(f"third{i} different words about cooking recipes {i * 3}" for i in range(60))


@pytest.mark.parametrize("verify", [True, False])
def test_stage_counts_per_source_and_cluster_sizes_recomputed_from_its_outputs(workdir, tiny_params, verify):
    # a cluster of 12 exact copies (size "11+"), and a cluster of 3 around the reference's
    # document: an exact copy and a near copy in the crawl
    params = tiny_params.model_copy(update={"dedup": tiny_params.dedup.model_copy(update={"verify": verify})})
    crawl = [doc_row(f"web_crawl/o{i}", "web_crawl", OTHER) for i in range(12)]
    crawl += [doc_row("web_crawl/near", "web_crawl", edit(BASE)), doc_row("web_crawl/copy", "web_crawl", BASE),
              doc_row("web_crawl/third", "web_crawl", THIRD)]
    texts_in = {"python_docs": {"python_docs/a": BASE}, "web_crawl": {r["id"]: r["text"] for r in crawl}}
    write_docs(workdir / "data/filtered/python_docs", [doc_row("python_docs/a", "python_docs", BASE)])
    write_docs(workdir / "data/filtered/web_crawl", crawl, shard_docs=4)  # 4 shards
    write_docs(workdir / "data/filtered/python_code", [doc_row("python_code/c", "python_code", "def f():\n    return 1\n")])
    texts_in["python_code"] = {"python_code/c": "def f():\n    return 1\n"}
    m = dedup.run(params, {"filtered": workdir / "data/filtered"}, {"dedup": workdir / "data/dedup", "report": workdir / "reports/dedup"})
    # recomputed from what was written: a removed document is an exact one when a kept one has its text
    kept = {name: {r["id"] for r in read_docs(workdir / f"data/dedup/{name}")} for name in texts_in}
    kept_texts = {texts_in[n][i] for n in kept for i in kept[n]}
    for name, docs in texts_in.items():
        removed = [i for i in docs if i not in kept[name]]
        exact = sum(docs[i] in kept_texts for i in removed)
        assert m["sources"][name] == {"docs_in": len(docs), "kept": len(kept[name]), "exact_removed": exact,
                                      "near_removed": len(removed) - exact}, name
    assert m["sources"]["web_crawl"] == {"docs_in": 15, "kept": 2, "exact_removed": 12, "near_removed": 1}
    assert m["cluster_sizes"] == {"2": 0, "3": 1, "4-5": 0, "6-10": 0, "11+": 1} and m["largest_cluster"] == 12
    assert m["docs_in"] == 17 and m["kept"] == 4


def test_a_duplicated_id_is_named_with_its_shard(workdir, tiny_params):
    rows = [doc_row(f"web_crawl/{i}", "web_crawl", t) for i, t in [("y0", BASE), ("y1", OTHER), ("x", THIRD), ("y2", edit(BASE)), ("x", OTHER)]]
    write_docs(workdir / "data/filtered/web_crawl", rows, shard_docs=2)  # the first x opens the second shard
    write_docs(workdir / "data/filtered/python_docs", [doc_row("python_docs/a", "python_docs", BASE)])
    with pytest.raises(StageError, match=r"1 document id\(s\) occur more than once .* e\.g\. 'web_crawl/x' \(.*web_crawl/part-00001\.parquet\)"):
        dedup.run(tiny_params, {"filtered": workdir / "data/filtered"}, {"dedup": workdir / "data/dedup", "report": workdir / "reports/dedup"})


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
    # with neighbours: also each member to the member before it (not again to the first)
    a, b = dedup.bucket_edges(np.array([7, 3, 7, 7, 3, 9, 7], dtype=np.uint64), neighbours=True)
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 3), (0, 6), (1, 4), (2, 3), (3, 6)]


def test_stage_on_generated_crawl_scores_well(workdir, tiny_params):
    for stage in (sources, collect, quality):
        run_stage(stage, tiny_params)
    m = run_stage(dedup, tiny_params)
    assert m["kept"] < m["docs_in"]
    assert m["vs_ground_truth"]["recall"] > 0.9 and m["vs_ground_truth"]["precision"] > 0.9


# --- tasks/lib/minhash.py: the compiled kernels against values computed by hand in Python ---

M64 = (1 << 64) - 1


def _fmix(h):
    h ^= h >> 33
    h = h * 0xFF51AFD7ED558CCD & M64
    h ^= h >> 33
    h = h * 0xC4CEB9FE1A85EC53 & M64
    return h ^ (h >> 33)


def _word_hash(word):  # FNV-1a over the UTF-8 bytes, then the murmur3 finaliser
    h = 0xCBF29CE484222325
    for b in word.encode():
        h = (h ^ b) * 0x100000001B3 & M64
    return _fmix(h)


def _shingle(words):
    x = 0
    for w in words:
        x = (x * 0x9E3779B97F4A7C15 + _word_hash(w)) & M64
    return _fmix(x ^ len(words))


def test_normalise_lowercases_keeps_letters_and_digits_and_breaks_on_the_rest():
    from tasks.lib import minhash as mh

    texts = ["Hello, World!  ÉCOLE—naïve 3.14", "snake_case İstanbul ΣΟΦΊΑ ½ x", "", None, "  ...  ", "\t-- Lead"]
    assert mh.normalise(pa.array(texts)).to_pylist() == [
        "hello world école naïve 3 14",
        "snake case istanbul σοφία ½ x",  # İ lowers to i (its first character); ½ is a number (No)
        "", "", "", "lead"]
    # a slice of an array and an uppercase letter whose lowercase is a longer UTF-8 sequence
    for kind in (pa.string(), pa.large_string()):
        sliced = pa.array(["skip me", "ȺB", "Ⱥ"], kind).slice(1, 2)
        assert mh.normalise(sliced).to_pylist() == ["ⱥb", "ⱥ"]
    # a multi-byte character cut off at the end of a string is a break, not a crash
    broken = pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, 4], np.int64)), pa.py_buffer(b"ab \xc3"))
    assert mh.normalise(broken).to_pylist() == ["ab"]


def test_no_letter_digit_or_cased_character_lies_above_the_tables_planes():
    from tasks.lib import minhash as mh

    for cp in range(mh._PLANES, 0x110000):
        ch = chr(cp)
        assert not ch.isalnum() and ch.lower() == ch, hex(cp)


def test_word_hashes_text_keys_and_signatures_match_the_hand_computation():
    from tasks.lib import minhash as mh

    norm = mh.normalise(pa.array(["The cat sat on it", "Dog", "", "dog"]))
    hashes, offsets = mh.word_hashes(norm)
    assert offsets.tolist() == [0, 5, 6, 6, 7]
    spaced, spaced_off = mh.word_hashes(pa.array([" the  cat "]))  # not normalised: no empty word
    assert spaced.tolist() == [_word_hash("the"), _word_hash("cat")] and spaced_off.tolist() == [0, 2]
    assert hashes.tolist() == [_word_hash(w) for w in ["the", "cat", "sat", "on", "it", "dog", "dog"]]
    a, b = mh.permutations(4, seed=3)
    assert (a % 2 == 1).all()
    sig = mh.signatures(hashes, offsets, 3, 4, 3)
    shingles = [_shingle(["the", "cat", "sat"]), _shingle(["cat", "sat", "on"]), _shingle(["sat", "on", "it"])]
    for p in range(4):
        assert sig[0, p] == min((int(a[p]) * x + int(b[p])) & M64 for x in shingles) >> 32
        assert sig[1, p] == ((int(a[p]) * _shingle(["dog"]) + int(b[p])) & M64) >> 32  # shorter than k: one shingle
    assert (sig[2] == mh.EMPTY).all() and (sig[1] == sig[3]).all()
    keys = mh.text_keys(norm)
    assert (keys[1] == keys[3]).all() and not (keys[0] == keys[1]).any()
    assert (mh.text_keys(pa.array(["the cat"]))[0] == mh.text_keys(mh.normalise(pa.array(["THE, cat!"])))[0]).all()
    hi, lo = mh.text_keys(pa.array(["the cat"]))[0]
    assert mh.prefix_keys(pa.array(["The cat sat on it", "the  CAT"]), [2, 5]) == [int(hi) << 64 | int(lo)] * 2
    # band keys: per band, acc = band + 1, then acc * MUL + value for its rows, folded; mod 2^64
    keys = mh.band_keys(sig, 2, 2)
    assert keys.dtype == np.uint64
    for d in range(4):
        for band in range(2):
            acc = band + 1
            for r in range(2):
                acc = (acc * int(mh._MUL) + int(sig[d, band * 2 + r])) & M64
            assert int(keys[d, band]) == acc ^ (acc >> 29)
    # two empty documents share no shingle: similarity 0, not 1
    assert mh.jaccard(sig[2], sig[2]) == 0.0 and mh.jaccard(sig[[2, 1]], sig[[2, 3]]).tolist() == [0.0, 1.0]


def test_signature_agreement_estimates_the_jaccard_similarity():
    from tasks.lib import minhash as mh

    # 1-word shingles: A = w0..w199, B = w100..w299 share 100 of 300 words, J = 1/3
    a = " ".join(f"w{i}" for i in range(200))
    b = " ".join(f"w{i}" for i in range(100, 300))
    norm = mh.normalise(pa.array([a, b, b]))
    sig = mh.signatures(*mh.word_hashes(norm), 1, 1024, 7)
    assert abs(mh.jaccard(sig[0], sig[1]) - 1 / 3) < 0.05  # std of the estimate: 0.015
    assert mh.jaccard(sig[1], sig[2]) == 1.0
    # a different seed gives different permutations, the same estimate
    sig2 = mh.signatures(*mh.word_hashes(norm), 1, 1024, 8)
    assert (sig2 != sig).any() and abs(mh.jaccard(sig2[0], sig2[1]) - 1 / 3) < 0.05


BOUNDS_SCRIPT = r"""
import numpy as np, pyarrow as pa
from tasks.lib import minhash as mh

def raw(b):  # a one-string array of any bytes, invalid UTF-8 included, sized exactly
    return pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(b)], np.int64)), pa.py_buffer(b))

cases = [pa.array(["Ⱥ" * 1000]),               # lower-casing grows 2 -> 3 bytes: the normaliser's worst case
         pa.array(["A"] * 1000),                # one-letter documents: the most words per byte
         pa.array([" " * 41, "a  b   c "]),     # not normalised: spaces around and between words
         raw(b"a\xf0\x9f\x98"), raw(b"ab\xe2\x82"), raw(b"x\xc3"), raw(b"\xbf\xff z")]  # cut-off and stray bytes
for texts in cases:
    norm = mh.normalise(texts)
    for arr in (texts, norm):
        h, off = mh.word_hashes(arr)
        mh.signatures(h, off, 3, 16, 1)
        mh.text_keys(arr)
    mh.prefix_keys(texts, [2] * len(texts))
print("ok", mh.normalise(raw(b"a\xf0\x9f\x98")).to_pylist(), mh.normalise(raw(b"\xbf\xff z")).to_pylist())
"""


def test_the_kernels_stay_in_bounds_on_worst_case_input(tmp_path):
    """numba does not check bounds: a buffer sized one byte short would corrupt memory
    silently. Run the worst cases with bounds checking on (a subprocess: the flag is read at
    compile time, and its own cache keeps the checked code apart)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", BOUNDS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok ['a'] ['z']"
