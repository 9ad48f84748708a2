"""collect: the three source kinds, and bad documents dropped with a reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import collect
from tasks.lib import corpora as builtin
from tasks.config import CrawlMix, parse_params
from tasks.lib.errors import StageError
from tasks.lib.storage import read_docs
from tests.conftest import run_stage, tiny_raw_params


def params_with(sources, weights=None):
    raw = tiny_raw_params()
    raw["collect"]["sources"] = sources
    raw["mix"]["weights"] = weights or {s["name"]: 1.0 for s in sources}
    return parse_params(raw)


def test_files_source_counts_every_bad_document(workdir):
    lines = [
        json.dumps({"id": "a", "text": "A fine document about parsing."}).encode(),
        b'{"id": "b", "text": "bad \xff\xfe utf8"}',
        json.dumps({"id": "c", "text": "   "}).encode(),
        json.dumps({"id": "d", "text": "x" * 500}).encode(),
        json.dumps({"id": "e", "body": "no text field"}).encode(),
        b"{not json",
        json.dumps({"id": "a", "text": "same id again"}).encode(),
        json.dumps({"id": "f", "text": "lone surrogate \ud800 here"}).encode(),
        json.dumps({"id": "g", "text": "Another fine document."}).encode(),
    ]
    (workdir / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    params = params_with([{"name": "mine", "kind": "files", "role": "crawl", "globs": ["*.jsonl"], "id_field": "id"}])
    params = params.model_copy(update={"collect": params.collect.model_copy(update={"max_chars": 400})})
    m = run_stage(collect, params)
    assert m["sources"]["mine"]["docs"] == 2
    assert m["sources"]["mine"]["dropped"] == {
        "invalid_utf8": 2, "empty": 1, "too_large": 1, "missing_text_field": 1, "invalid_json": 1, "duplicate_id": 1,
    }
    rows = read_docs(workdir / "data/raw/mine")
    assert [r["id"] for r in rows] == ["mine/a", "mine/g"]
    assert rows[0]["text"] == "A fine document about parsing."


def test_text_and_parquet_files(workdir):
    (workdir / "docs").mkdir()
    (workdir / "docs/one.txt").write_text("first document", encoding="utf-8")
    pq.write_table(pa.table({"body": ["p0", "p1"], "key": ["k0", "k1"]}), workdir / "docs/t.parquet")
    params = params_with([
        {"name": "txt", "kind": "files", "role": "reference", "globs": ["docs/*.txt"]},
        {"name": "pq", "kind": "files", "role": "crawl", "globs": ["docs/*.parquet"], "text_field": "body", "id_field": "key"},
    ])
    run_stage(collect, params)
    assert [r["text"] for r in read_docs(workdir / "data/raw/txt")] == ["first document"]
    assert [(r["id"], r["text"]) for r in read_docs(workdir / "data/raw/pq")] == [("pq/k0", "p0"), ("pq/k1", "p1")]


def test_a_limit_counts_documents_across_the_files_of_a_source(workdir):
    # 2 files of 3 documents, limit 4: the whole first file (sorted) and the first of the second
    (workdir / "docs").mkdir()
    for f in ("a", "b"):
        lines = [json.dumps({"id": f"{f}{i}", "text": f"document {f}{i}"}) for i in range(3)]
        (workdir / f"docs/{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = run_stage(collect, params_with([{"name": "lim", "kind": "files", "role": "crawl", "globs": ["docs/*.jsonl"], "id_field": "id", "limit": 4}]))
    assert m["sources"]["lim"]["docs"] == 4
    assert [r["id"] for r in read_docs(workdir / "data/raw/lim")] == ["lim/a0", "lim/a1", "lim/a2", "lim/b0"]


def test_hf_source_from_local_json_arrives_intact(workdir):
    recs = [{"uid": f"r{i}", "content": f"Document {i}: naïve café — 東京 ✓", "lang": "xx"} for i in range(5)]
    (workdir / "local.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs), encoding="utf-8")
    params = params_with([{"name": "hfl", "kind": "hf", "role": "reference", "path": "json", "data_files": "local.json",
                           "text_field": "content", "id_field": "uid", "limit": 4}])
    m = run_stage(collect, params)
    rows = read_docs(workdir / "data/raw/hfl")
    assert m["sources"]["hfl"]["docs"] == 4
    assert [(r["id"], r["text"]) for r in rows] == [(f"hfl/r{i}", recs[i]["content"]) for i in range(4)]
    assert json.loads(rows[0]["meta"])["lang"] == "xx"


def test_hf_missing_text_field_is_a_clear_error(workdir):
    (workdir / "local.json").write_text(json.dumps({"body": "x"}) + "\n")
    params = params_with([{"name": "hfl", "kind": "hf", "role": "reference", "path": "json", "data_files": "local.json"}])
    with pytest.raises(StageError, match="no field 'text'.*body"):
        run_stage(collect, params)


def test_empty_source_and_missing_files_are_errors(workdir):
    (workdir / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(StageError, match="source 'e' yielded no usable document.*empty"):
        run_stage(collect, params_with([{"name": "e", "kind": "files", "role": "crawl", "globs": ["empty.jsonl"]}]))
    with pytest.raises(StageError, match="no file matches"):
        run_stage(collect, params_with([{"name": "m", "kind": "files", "role": "crawl", "globs": ["nope/*.jsonl"]}]))
    assert not (workdir / "data/raw").exists(), "a failed stage must not leave a partial output"


def test_failed_rerun_keeps_previous_output(workdir):
    (workdir / "ok.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    run_stage(collect, params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["ok.jsonl"]}]))
    with pytest.raises(StageError):
        run_stage(collect, params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["missing.jsonl"]}]))
    assert [r["text"] for r in read_docs(workdir / "data/raw/s")] == ["kept"]


def test_synthetic_crawl_is_deterministic_with_ground_truth():
    ref = [("ref/x", " ".join(["word"] * 50 + [f"w{i}" for i in range(100)]))]
    a = list(builtin.synthetic_crawl(200, CrawlMix().model_dump(), 7, ref))
    b = list(builtin.synthetic_crawl(200, CrawlMix().model_dump(), 7, ref))
    c = list(builtin.synthetic_crawl(200, CrawlMix().model_dump(), 8, ref))
    assert a == b and a != c and len(a) == 200
    kinds = {m["kind"].split(":")[0] for _, _, m in a}
    assert {"good", "boilerplate", "spam", "garbage", "short", "exact_duplicate", "near_duplicate"} <= kinds
    for _, text, m in a:
        assert isinstance(m["is_low_quality"], bool)
        if m["kind"] == "exact_duplicate":
            assert m["duplicate_of"]
    ids = {pid for pid, _, _ in a}
    texts = {pid: t for pid, t, _ in a}
    for pid, text, m in a:  # an exact duplicate has its original's text
        if m["kind"] == "exact_duplicate" and m["duplicate_of"].startswith("@"):
            assert m["duplicate_of"][1:] in ids and texts[m["duplicate_of"][1:]] == text


def test_builtin_python_corpora_are_real_text():
    docs = list(builtin.python_docs(limit=90))
    assert len(docs) == 90 and docs[0][0].startswith("topic/") and docs[-1][0].startswith("module/")
    code = list(builtin.python_code(limit=3, seed=1))
    assert len(code) == 3 and all(b"def " in c or b"import" in c for _, c, _ in code)


def test_files_are_read_in_parallel_and_ids_stay_unique_across_files(workdir):
    (workdir / "in").mkdir()
    for f in range(3):
        lines = [json.dumps({"id": f"k{i}" if i < 2 else f"f{f}-{i}", "text": f"file {f} document {i}"}) for i in range(5)]
        (workdir / "in" / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
    results = []
    for workers in (1, 2):
        params = params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["in/*.jsonl"], "id_field": "id"}])
        params = params.model_copy(update={"executor": params.executor.model_copy(update={"workers": workers})})
        m = run_stage(collect, params)
        rows = read_docs(workdir / "data/raw/s")
        results.append([(r["id"], r["text"]) for r in rows])
        assert m["sources"]["s"]["dropped"] == {"duplicate_id": 4} and m["sources"]["s"]["docs"] == 11
    assert results[0] == results[1]
    assert [i for i, _ in results[0]][:2] == ["s/k0", "s/k1"] and dict(results[0])["s/k0"] == "file 0 document 0"  # the first file wins


def test_one_repeated_id_in_a_later_shard_of_a_later_file_and_short_documents_are_dropped_by_name(workdir):
    # shard_docs 2: file 1's shards are [b0 b1] [b2 a3] [b4]; a3 repeats file 0's a3 (the only
    # repeated id); "tiny" is shorter than min_chars
    (workdir / "in").mkdir()
    for f, ids in ((0, ["a0", "a1", "a2", "a3", "a4"]), (1, ["b0", "b1", "b2", "a3", "b4"])):
        lines = [json.dumps({"id": i, "text": f"document {i} of file {f}"}) for i in ids]
        (workdir / "in" / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "in/2.jsonl").write_text(json.dumps({"id": "tiny", "text": "short"}) + "\n")
    params = params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["in/*.jsonl"], "id_field": "id"}])
    params = params.model_copy(update={"collect": params.collect.model_copy(update={"shard_docs": 2, "min_chars": 10})})
    m = run_stage(collect, params)
    assert m["sources"]["s"]["dropped"] == {"duplicate_id": 1, "too_short": 1} and m["sources"]["s"]["docs"] == 9
    assert [r["id"] for r in read_docs(workdir / "data/raw/s")] == [f"s/a{i}" for i in range(5)] + ["s/b0", "s/b1", "s/b2", "s/b4"]
    assert len(list((workdir / "data/raw/s").glob("*.parquet"))) == 7  # 3 shards of at most 2 per file, and the third file's empty one


def test_compressed_jsonl_and_text_read_as_plain(workdir):
    import gzip

    import zstandard

    docs = [{"id": str(i), "text": f"Document number {i} about compressed inputs."} for i in range(5)]
    body = "".join(json.dumps(d) + "\n" for d in docs).encode()
    (workdir / "plain").mkdir()
    (workdir / "plain/a.jsonl").write_bytes(body)
    (workdir / "packed").mkdir()
    (workdir / "packed/a.jsonl.gz").write_bytes(gzip.compress(body))
    (workdir / "packed/b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.replace(b'"id": "', b'"id": "z')))
    (workdir / "packed/c.txt.gz").write_bytes(gzip.compress("A whole text file, compressed.".encode()))
    srcs = [{"name": "plain", "kind": "files", "role": "crawl", "globs": ["plain/*"], "id_field": "id"},
            {"name": "packed", "kind": "files", "role": "crawl", "globs": ["packed/*"], "id_field": "id"}]
    m = run_stage(collect, params_with(srcs))
    assert m["sources"]["packed"]["docs"] == 11 and m["sources"]["plain"]["docs"] == 5
    plain = {r["id"].split("/", 1)[1]: r["text"] for r in read_docs(workdir / "data/raw/plain")}
    packed = {r["id"].split("/", 1)[1]: r["text"] for r in read_docs(workdir / "data/raw/packed")}
    assert {k: packed[k] for k in plain} == plain and {packed[f"z{k}"] for k in plain} == set(plain.values())
    assert "A whole text file, compressed." in packed.values()


@pytest.mark.parametrize("name, data", [("cut.jsonl.gz", None), ("bad.jsonl.zst", b"not zstd at all")])
def test_a_truncated_or_corrupt_archive_is_one_error_naming_it(workdir, name, data):
    import gzip

    (workdir / "in").mkdir()
    if data is None:
        data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200)))[:300]
    (workdir / "in" / name).write_bytes(data)
    with pytest.raises(StageError, match=name.replace(".", r"\.")):
        run_stage(collect, params_with([{"name": "s", "kind": "files", "role": "crawl", "globs": ["in/*"]}]))
    assert not (workdir / "data/raw").exists() or not any((workdir / "data/raw").rglob("*.parquet"))


def test_the_crawls_copies_of_reference_pages_name_the_reference_source_in_any_order(workdir):
    """The synthetic crawl copies pages of the python_docs source collected in the same run, and
    its ground truth names them by that source's collected ids, whatever the source is called
    and wherever it sits in the list (here after a code source, which must not be taken for it)."""
    raw = tiny_raw_params()["collect"]["sources"]
    by_name = {s["name"]: s for s in raw}
    sources = [by_name["python_code"], by_name["web_crawl"], {**by_name["python_docs"], "name": "zz_reference"}]
    run_stage(collect, params_with(sources))
    ref = {r["id"]: r["text"] for r in read_docs(workdir / "data/raw/zz_reference")}
    crawl = read_docs(workdir / "data/raw/web_crawl")
    cross = [json.loads(r["meta"])["duplicate_of"] for r in crawl]
    cross = [d for d in cross if d and not d.startswith("web_crawl/")]
    assert cross and all(d in ref for d in cross), cross[:3]
