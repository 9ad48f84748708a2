"""mix, tokenizer, tokenize: weights met, text round-trips, same seed gives the same bytes."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tasks import collect, dedup, mix, quality, tokenize, tokenizer
from tasks.config import SPECIAL_TOKENS
from tasks.storage import doc_row, read_docs, write_docs
from tests.conftest import run_stage


def synthetic_dedup(root: Path, sizes: dict[str, tuple[int, int]]):
    """sources -> (documents, bytes per document)"""
    for name, (n, size) in sizes.items():
        write_docs(root / name, [doc_row(f"{name}/{i}", name, (f"{name} {i} " * size)[:size]) for i in range(n)])


def mix_params(tiny_params, weights, **kw):
    m = tiny_params.mix.model_copy(update={"weights": weights, **kw})
    return tiny_params.model_copy(update={"mix": m})


def test_mixture_matches_weights_with_epochs_and_subsampling(workdir, tiny_params):
    synthetic_dedup(workdir / "data/dedup", {"python_docs": (100, 200), "python_code": (400, 300), "web_crawl": (300, 500)})
    params = mix_params(tiny_params, {"python_docs": 0.5, "python_code": 0.2, "web_crawl": 0.3}, max_epochs=10.0)
    m = run_stage(mix, params)
    for name, s in m["sources"].items():
        assert abs(s["realised_share"] - s["target_share"]) < 0.02, (name, s)
    assert m["sources"]["python_docs"]["epochs"] > 2  # small, heavily weighted: repeated
    assert m["sources"]["python_code"]["epochs"] < 1  # large, lightly weighted: subsampled
    train = read_docs(workdir / "data/mix/train")
    val = read_docs(workdir / "data/mix/val")
    assert len(train) == m["train_docs"]
    assert not {r["id"] for r in train} & {r["id"] for r in val}, "validation documents leak into train"
    assert len({r["source"] for r in train[:50]}) == 3, "train rows are shuffled across sources"


def test_mixture_in_documents_and_epoch_cap(workdir, tiny_params):
    synthetic_dedup(workdir / "data/dedup", {"python_docs": (20, 100), "python_code": (200, 100), "web_crawl": (200, 100)})
    params = mix_params(tiny_params, {"python_docs": 0.8, "python_code": 0.1, "web_crawl": 0.1}, unit="docs", max_epochs=2.0)
    m = run_stage(mix, params)
    assert m["sources"]["python_docs"]["capped"] is True
    assert m["sources"]["python_docs"]["epochs"] <= 2.0


def test_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    corpus = ["def f(x):\n    return x * 2\n", "Héllo wörld — naïve café 東京 🚀", "The quick brown fox."] * 50
    tok = tokenizer.train_bpe(iter(corpus), 400, 1)
    for text in corpus[:3] + ["unseen bytes: \x01\x7f ☃ ∑ zebra", "  leading spaces\n\n\ttabs"]:
        assert tok.decode(tok.encode(text).ids) == text
    for special in SPECIAL_TOKENS.values():
        assert len(tok.encode(special).ids) == 1
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS.values()] == list(range(len(SPECIAL_TOKENS)))


def run_data_half(tiny_params):
    return {s.STAGE: run_stage(s, tiny_params) for s in (collect, quality, dedup, mix, tokenizer, tokenize)}


def test_token_files_decode_back_to_the_mixture(workdir, tiny_params):
    metrics = run_data_half(tiny_params)
    meta = json.loads((workdir / "data/tokens/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 600
    tok = tokenizer.load_tokenizer(workdir / "models/tokenizer")
    eot = meta["special_tokens"]["eot"]
    for split in ("train", "val"):
        ids = np.memmap(workdir / f"data/tokens/{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(ids) == meta["splits"][split]["tokens"] == metrics["tokenize"][f"{split}_tokens"]
        docs = np.split(np.asarray(ids), np.flatnonzero(ids == eot) + 1)[:-1]
        rows = read_docs(workdir / f"data/mix/{split}")
        assert len(docs) == len(rows)
        for row, doc in list(zip(rows, docs))[:30]:
            assert tok.decode(doc[:-1].tolist()) == row["text"]
    assert metrics["tokenizer"]["bytes_per_token_all"] > 1.5


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
