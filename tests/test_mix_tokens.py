"""mix, tokenizer, tokenize: weights met, text round-trips, same seed gives the same bytes."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tasks import collect, dedup, mix, quality, sources, tokenize, tokenizer
from tasks.lib.bpe import SPECIAL_TOKENS, load_tokenizer, train_bpe
from tasks.lib.mixture import read_index
from tasks.lib.storage import doc_row, read_docs, write_docs
from tests.conftest import run_stage


def synthetic_dedup(root: Path, sizes: dict[str, tuple[int, int]]):
    """sources -> (documents, bytes per document)"""
    for name, (n, size) in sizes.items():
        write_docs(root / name, [doc_row(f"{name}/{i}", name, (f"{name} {i} " * size)[:size]) for i in range(n)])


def mix_params(tiny_params, weights, **kw):
    m = tiny_params.mix.model_copy(update={"weights": weights, **kw})
    return tiny_params.model_copy(update={"mix": m})


def test_mixture_matches_weights_with_epochs_and_subsampling(workdir, tiny_params, capsys):
    synthetic_dedup(workdir / "data/dedup", {"python_docs": (100, 200), "python_code": (400, 300), "web_crawl": (300, 500)})
    params = mix_params(tiny_params, {"python_docs": 0.5, "python_code": 0.2, "web_crawl": 0.3}, max_epochs=10.0)
    m = run_stage(mix, params)
    assert "mix: 100%" in capsys.readouterr().err  # the progress line names its stage (DVC and Prefect logs interleave stages)
    for name, s in m["sources"].items():
        assert abs(s["realised_share"] - s["target_share"]) < 0.02, (name, s)
    assert m["sources"]["python_docs"]["epochs"] > 2  # small, heavily weighted: repeated
    assert m["sources"]["python_code"]["epochs"] < 1  # large, lightly weighted: subsampled
    index = read_index(workdir / "data/mix", workdir / "data/dedup")
    assert sum(int(c.sum()) for parts in index.values() for _, c, _ in parts) == m["train_docs"]
    assert not any(((c > 0) & v).any() for parts in index.values() for _, c, v in parts), "validation documents leak into train"
    docs = index["python_docs"][0][1]
    assert docs.max() >= 3 and set(np.unique(docs)) <= {0, docs.max() - 1, docs.max()}  # whole passes, then a partial one
    assert not list((workdir / "data/mix").rglob("*.parquet")) == [] and not (workdir / "data/mix/train").exists()  # an index, no copies


def test_mixture_in_documents_and_epoch_cap(workdir, tiny_params):
    synthetic_dedup(workdir / "data/dedup", {"python_docs": (20, 100), "python_code": (200, 100), "web_crawl": (200, 100)})
    params = mix_params(tiny_params, {"python_docs": 0.8, "python_code": 0.1, "web_crawl": 0.1}, unit="docs", max_epochs=2.0)
    m = run_stage(mix, params)
    assert m["sources"]["python_docs"]["capped"] is True
    assert m["sources"]["python_docs"]["epochs"] <= 2.0


def test_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    corpus = ["def f(x):\n    return x * 2\n", "Héllo wörld — naïve café 東京 🚀", "The quick brown fox."] * 50
    tok = train_bpe(iter(corpus), 400, 1)
    for text in corpus[:3] + ["unseen bytes: \x01\x7f ☃ ∑ zebra", "  leading spaces\n\n\ttabs"]:
        assert tok.decode(tok.encode(text).ids) == text
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS.values()]
    assert ids == list(range(len(SPECIAL_TOKENS)))  # fixed, small ids, inserted by the template only
    for special in SPECIAL_TOKENS.values():  # the same strings inside text stay text
        enc = tok.encode(f"a {special} b").ids
        assert not set(enc) & set(ids) and tok.decode(enc) == f"a {special} b"


def test_a_worker_loads_the_tokenizer_once_and_again_when_it_changes(tmp_path):
    corpus = ["alpha beta gamma delta", "epsilon zeta eta theta"] * 20
    folder = tmp_path / "tok"
    folder.mkdir()
    train_bpe(iter(corpus), 300, 1).save(str(folder / "tokenizer.json"))
    first = tokenize.worker_tokenizer(str(folder))
    assert tokenize.worker_tokenizer(str(folder)) is first  # one instance per worker, not one per shard
    replacement = tmp_path / "new.json"
    train_bpe(iter(corpus[:2] * 5), 280, 1).save(str(replacement))
    replacement.replace(folder / "tokenizer.json")  # a new tokenizer at the same path (a new file)
    second = tokenize.worker_tokenizer(str(folder))
    assert second is not first and second.get_vocab_size() != first.get_vocab_size()
    assert second.encode_special_tokens  # loaded the project's way: special strings stay text


def run_data_half(tiny_params):
    return {s.STAGE: run_stage(s, tiny_params) for s in (sources, collect, quality, dedup, mix, tokenizer, tokenize)}


def test_token_files_decode_back_to_the_mixture(workdir, tiny_params):
    metrics = run_data_half(tiny_params)
    meta = json.loads((workdir / "data/tokens/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 600
    assert metrics["tokenize"]["vocab_size"] == 600 and metrics["tokenize"]["dtype"] == "uint16"
    tok = load_tokenizer(workdir / "models/tokenizer")
    eot = meta["special_tokens"]["eot"]
    index = read_index(workdir / "data/mix", workdir / "data/dedup")
    for split in ("train", "val"):
        ids = np.memmap(workdir / f"data/tokens/{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(ids) == meta["splits"][split]["tokens"] == metrics["tokenize"][f"{split}_tokens"]
        docs = np.split(np.asarray(ids), np.flatnonzero(ids == eot) + 1)[:-1]
        texts = []  # what the index says, in shard order, each train document as many times as its count
        for source in sorted(index):
            for path, counts, val in index[source]:
                rows = read_docs_of(path)
                for r, row in enumerate(rows):
                    texts += [row["text"]] * (int(counts[r]) if split == "train" else int(val[r]))
        assert len(docs) == len(texts) == meta["splits"][split]["docs"]
        for text, doc in list(zip(texts, docs))[:40]:
            assert tok.decode(doc[:-1].tolist()) == text
    assert metrics["tokenizer"]["bytes_per_token_all"] > 1.5


def read_docs_of(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_special_token_strings_in_documents_stay_text(workdir, tiny_params):
    write_docs(workdir / "data/dedup/python_docs", [doc_row("python_docs/a", "python_docs", "A doc with <|endoftext|> inside and <|user|> too. " * 20)])
    write_docs(workdir / "data/dedup/python_code", [doc_row("python_code/b", "python_code", "x = 1  # <|assistant|>\n" * 20)])
    write_docs(workdir / "data/dedup/web_crawl", [doc_row("web_crawl/c", "web_crawl", "Plain words of the crawl. " * 20)])
    params = mix_params(tiny_params, {"python_docs": 1.0, "python_code": 1.0, "web_crawl": 1.0}, val_fraction=0.01)
    for stage in (mix, tokenizer, tokenize):
        run_stage(stage, params)
    meta = json.loads((workdir / "data/tokens/meta.json").read_text())
    ids = np.fromfile(workdir / "data/tokens/train.bin", dtype=meta["dtype"])
    specials = meta["special_tokens"]
    assert int((ids == specials["eot"]).sum()) == meta["splits"]["train"]["docs"], "one separator per document, none from text"
    assert not set(ids.tolist()) & {specials[k] for k in ("user", "assistant", "end_of_turn", "reward", "pad")}


def test_the_executor_does_not_change_the_outputs(tmp_path, monkeypatch, tiny_params):
    """One process or a pool of two: byte-identical data."""
    digests = []
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        monkeypatch.chdir(d)
        params = tiny_params.model_copy(update={"executor": tiny_params.executor.model_copy(update={"workers": workers})})
        run_data_half(params)
        digests.append({**tree_digest(d / "data"), **tree_digest(d / "models")})
    assert digests[0] == digests[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_outputs(tmp_path, monkeypatch, tiny_params):
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        run_data_half(tiny_params)
        digests.append({**tree_digest(tmp_path / run / "data"), **tree_digest(tmp_path / run / "models")})
    assert digests[0] == digests[1]
    assert any(k.endswith("train.bin") for k in digests[0])


@pytest.mark.parametrize("weights, names", [
    ({"zeta": 5.0, "alpha": 2.0, "mid": 3.0}, ("zeta", "alpha", "mid")),          # unnormalised, names in no sorted order
    ({"alpha": 0.05, "mid": 0.6, "zeta": 0.35}, ("mid", "zeta", "alpha")),
])
def test_mix_shares_recomputed_from_the_shards_and_the_index(workdir, tiny_params, weights, names):
    """Several shards per source of different sizes; the realised byte shares recomputed here
    from the index rows and the shards' texts (pyarrow directly), not from the stage's figures."""
    import pyarrow.parquet as pq

    sizes = {"zeta": (230, 150), "alpha": (90, 400), "mid": (400, 60)}
    for name in names:
        n, size = sizes[name]
        write_docs(workdir / "data/dedup" / name, [doc_row(f"{name}/{i}", name, (f"{name} {i} " * size)[: size + i % 17])
                                                    for i in range(n)], shard_docs=37)
        assert len(list((workdir / "data/dedup" / name).glob("part-*.parquet"))) > 2
    params = mix_params(tiny_params.model_copy(update={"collect": tiny_params.collect.model_copy(update={"sources": [
        s.model_copy(update={"name": n}) for s, n in zip(tiny_params.collect.sources, names)]})}), weights, max_epochs=50.0)
    m = run_stage(mix, params)
    train_bytes, available, train_docs = {}, 0, 0
    for name in names:
        index = pq.read_table(workdir / "data/mix" / f"{name}.parquet").to_pylist()
        texts = {}
        for shard in {r["shard"] for r in index}:
            assert shard.startswith(f"{name}/")
            texts[shard] = pq.read_table(workdir / "data/dedup" / shard, columns=["text"]).column("text").to_pylist()
        assert len({(r["shard"], r["row"]) for r in index}) == len(index)  # one row per document used
        assert all(0 <= r["row"] < len(texts[r["shard"]]) for r in index)
        train_bytes[name] = sum(len(texts[r["shard"]][r["row"]].encode()) * r["train_count"] for r in index)
        train_docs += sum(r["train_count"] for r in index)
        val_rows = {(r["shard"], r["row"]) for r in index if r["val"]}
        assert not any(r["val"] and r["train_count"] for r in index)
        available += sum(len(t.encode()) for shard, ts in texts.items() for row, t in enumerate(ts) if (shard, row) not in val_rows)
    total, wsum = sum(train_bytes.values()), sum(weights.values())
    assert params.mix.total is None  # then the mixture is as large as the training documents together
    assert abs(total - available) <= 3 * 500
    for name in names:
        assert train_bytes[name] / total == pytest.approx(weights[name] / wsum, abs=0.02), (name, train_bytes)
        assert train_bytes[name] / total == pytest.approx(m["sources"][name]["realised_share"], abs=1e-3)  # what it reports is what it wrote
        index = pq.read_table(workdir / "data/mix" / f"{name}.parquet").to_pylist()
        assert m["sources"][name]["unique_docs"] == sum(r["train_count"] > 0 for r in index)
        assert m["sources"][name]["docs"] == sum(r["train_count"] for r in index)
        assert m["sources"][name]["val_docs"] == sum(r["val"] for r in index)
    assert train_docs == m["train_docs"]
    assert m["max_share_error"] == pytest.approx(max(abs(train_bytes[n] / total - weights[n] / wsum) for n in names), abs=2e-3)


def test_unigram_entropy_by_hand_over_chunk_boundaries_and_meta_read_as_numbers(tmp_path):
    from tasks.lib.tokens import token_files, unigram_entropy

    # counts {0: 2, 1: 1, 2: 1}: H = -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2, whatever the chunk size
    data = np.array([0, 0, 1, 2], dtype=np.uint16)
    for chunk in (1, 2, 3, 4, 8):
        assert unigram_entropy(data, vocab=5, chunk=chunk) == pytest.approx(1.5 * np.log(2))
    # meta.json written by hand with the vocabulary as a string: read back as the number
    data.tofile(tmp_path / "train.bin")
    np.array([1], dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": "5",
                                                    "splits": {"train": {"tokens": 4}, "val": {"tokens": 1}}}))
    train, val, meta = token_files(tmp_path)
    assert train.tolist() == [0, 0, 1, 2] and val.tolist() == [1] and meta["vocab_size"] == 5
