"""Evaluation metrics on hand-made inputs, the promotion rule, aliases in a real MLflow registry."""

import subprocess
import sys
import uuid

import pytest
import torch

from tasks import evaluate, registry
from tasks.model import GPT, ModelConfig, save_checkpoint
from tests.conftest import REPO


def test_distinct_n_and_self_similarity():
    assert evaluate.distinct_n([[1, 2, 3], [1, 2, 4]], 1) == 4 / 6
    assert evaluate.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4
    assert evaluate.distinct_n([[1]], 2) == 0.0
    assert evaluate.self_similarity([["a b c", "a b c"], ["x y", "z w"]]) == pytest.approx(0.5)


def test_win_rate_counts_ties_half_and_gives_an_interval():
    w = evaluate.win_rate([1, 2, 3, 5], [0, 2, 4, 1])  # win, tie, loss, win
    assert w["rate"] == pytest.approx(2.5 / 4) and w["n"] == 4
    assert w["ci_low"] < w["rate"] < w["ci_high"]
    big = evaluate.win_rate([1] * 400, [0] * 400)
    assert big["rate"] == 1.0 and big["ci_low"] > 0.98
    with pytest.raises(ValueError):
        evaluate.win_rate([1], [1, 2])


@pytest.mark.parametrize("candidate, champion, margin, promote", [
    (0.6, None, 0.0, True), (0.6, 0.5, 0.0, True), (0.5, 0.5, 0.0, True), (0.52, 0.5, 0.05, False), (0.4, 0.5, 0.0, False),
])
def test_promotion_rule(candidate, champion, margin, promote):
    ok, reason = evaluate.decide(candidate, champion, margin)
    assert ok is promote and reason


@pytest.fixture
def registered(tmp_path):
    """Three versions of a tiny chat model in a fresh registered model."""
    import mlflow

    from tasks.tokenizer import train_bpe
    from tasks.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("test-registry")
    tok = train_bpe(iter(["What does len do? Return the number of items."] * 30), 300, 1)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    name = f"assistant-{uuid.uuid4().hex[:6]}"
    versions = []
    for i in range(3):
        torch.manual_seed(i)
        folder = tmp_path / f"ck{i}"
        save_checkpoint(folder, GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=64)), tmp_path / "tok", {"chat": True})
        with mlflow.start_run(run_name=f"train-{i}"):
            versions.append(registry.register_checkpoint(name, folder, {"git.commit": "test"}))
    return name, versions


def promote(name, version, value, champion_value, margin=0.0):
    ok, _ = evaluate.decide(value, champion_value, margin)
    registry.set_alias(name, "champion" if ok else "challenger", version)


def test_champion_moves_only_on_a_win(registered):
    name, (v1, v2, v3) = registered
    assert registry.alias_version(name, "champion") is None
    promote(name, v1, 0.50, None)  # first candidate: becomes champion
    promote(name, v2, 0.62, 0.50)  # planted better candidate: takes the alias
    assert registry.alias_version(name, "champion") == v2
    promote(name, v3, 0.40, 0.62)  # planted worse candidate: challenger only
    assert registry.alias_version(name, "champion") == v2
    assert registry.alias_version(name, "challenger") == v3


def test_loading_by_alias_gives_a_model_that_generates(registered):
    import mlflow

    name, (v1, _, _) = registered
    registry.set_alias(name, "champion", v1)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(["What does len do?"], params={"max_new_tokens": 5})
    assert len(out) == 1 and isinstance(out[0], str)
    folder = registry.download_checkpoint(f"models:/{name}@champion")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--model", f"models:/{name}@champion", "--prompt", "What does len do?",
                          "--max-new-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", "/nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr
