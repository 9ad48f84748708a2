"""Evaluation metrics on hand-made inputs, the promotion rule, aliases in a real MLflow registry."""

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tasks import evaluate
from tasks.lib import registry
from tasks.lib.model import GPT, ModelConfig, save_checkpoint
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
    (0.6, None, 0.0, True), (0.6, 0.5, 0.0, True), (0.5, 0.5, 0.0, False), (0.52, 0.5, 0.05, False), (0.56, 0.5, 0.05, True),
    (0.4, 0.5, 0.0, False),
])
def test_promotion_rule(candidate, champion, margin, promote):
    ok, reason = evaluate.decide(candidate, champion, margin)
    assert ok is promote and reason


@pytest.fixture
def registered(tmp_path):
    """Three versions of a tiny chat model in a fresh registered model."""
    import mlflow

    from tasks.lib.bpe import train_bpe
    from tasks.lib.tracking import tracking_uri

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


def test_promotion_branches_of_the_stage_code(registered):
    from types import SimpleNamespace

    name, (v1, v2, v3) = registered
    pr = SimpleNamespace(model=name, metric="win_rate_vs_sft_gold", min_margin=0.0)
    seen = []

    def champion_scores(value):
        def measure(version):
            seen.append(version)
            return value
        return measure

    def run(version, value, champion_value=None):
        return evaluate.promote(pr, {name: version}, {"models": {name: {pr.metric: value}}}, champion_scores(champion_value))

    assert registry.alias_version(name, "champion") is None
    first = run(v1, 0.50)  # no champion yet: the first candidate becomes champion
    assert first["decision"] == "champion" and registry.alias_version(name, "champion") == v1 and seen == []
    assert {k: v for k, v in first.items() if k != "reason"} == {
        "model": name, "metric": pr.metric, "judged_by": "the gold judge, independent of the reward model PPO optimised",
        "candidate_version": v1, "candidate_value": 0.50, "champion_version": None, "champion_value": None, "decision": "champion"}
    assert first["reason"]
    assert run(v1, 0.99)["decision"] == "unchanged" and seen == []  # the champion is not measured against itself
    better = run(v2, 0.6234567, champion_value=0.50)  # a planted better candidate takes the alias
    assert better["decision"] == "champion" and registry.alias_version(name, "champion") == v2 and seen == [v1]
    assert (better["champion_version"], better["champion_value"], better["candidate_value"]) == (v1, 0.50, 0.6234567)
    tie = run(v3, 0.62, champion_value=0.62)  # a tie does not promote
    assert tie["decision"] == "challenger" and registry.alias_version(name, "champion") == v2
    assert registry.alias_version(name, "challenger") == v3 and seen == [v1, v2]
    worse = run(v3, 0.40, champion_value=0.62)
    assert worse["decision"] == "challenger" and registry.alias_version(name, "champion") == v2
    assert run(None, 0.9)["decision"] == "none"  # an unregistered checkpoint is never promoted
    tags = mlflow_client().get_model_version(name, v2).tags
    assert tags[f"eval.{pr.metric}"] == "0.623457"  # rounded to 6 places
    missing = evaluate.promote(pr, {name: v3}, {"models": {name: {}}}, champion_scores(0.1))
    assert missing["decision"] == "none" and missing["reason"] == f"metric {pr.metric} is not measured for {name}"
    assert registry.alias_version(name, "champion") == v2
    rm = SimpleNamespace(model=name, metric="win_rate_vs_sft_rm", min_margin=0.0)
    assert evaluate.promote(rm, {name: v2}, {"models": {name: {rm.metric: 0.7}}}, champion_scores(0.1))["judged_by"] == (
        "the reward model that PPO optimised (it can be exploited: compare the gold judge's win rate)")


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


def test_loading_by_alias_gives_a_model_that_generates(registered):
    import mlflow

    name, (v1, _, _) = registered
    registry.set_alias(name, "champion", v1)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(["What does len do?"], params={"max_new_tokens": 5})
    assert len(out) == 1 and isinstance(out[0], str)
    # the signature declares the generation params, and predict honours them
    params = {p.name: p.default for p in model.metadata.signature.params.params}
    assert params == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    from tasks.lib.bpe import load_tokenizer

    tok = load_tokenizer(registry.download_checkpoint(f"models:/{name}@champion"))
    lengths = {n: len(tok.encode(model.predict(["What does len do?"], params={"max_new_tokens": n, "temperature": 1.0})[0]).ids) for n in (1, 12)}
    assert lengths[1] <= 1 < lengths[12]
    hot = [model.predict(["What does len do?"], params={"max_new_tokens": 12, "temperature": 1.5, "seed": s})[0] for s in (0, 1)]
    assert hot[0] != hot[1], "temperature and seed must reach the sampler"
    import pandas as pd

    assert model.predict(pd.DataFrame({"prompt": ["a", "b"]}), params={"max_new_tokens": 2}) is not None
    reqs = (Path(registry.download_checkpoint(f"models:/{name}@champion")).parents[1] / "requirements.txt")
    if reqs.is_file():
        assert all("==" in line for line in reqs.read_text().split() if line and not line.startswith("mlflow"))
    folder = registry.download_checkpoint(f"models:/{name}@champion")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--model", f"models:/{name}@champion", "--prompt", "What does len do?",
                          "--max-new-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "tasks.chat", "--checkpoint", "/nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr


def test_report_images_are_embedded_for_prefect(tmp_path):
    from flows.pipeline import embed_images

    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    md = embed_images("text ![scores](plot.png) and ![missing](nope.png)", tmp_path)
    assert "![scores](data:image/png;base64,iVBORyBmYWtl)" in md and "![missing](nope.png)" in md


@pytest.fixture
def evaluator_parts():
    from tasks.config import parse_params
    from tasks.lib.bpe import train_bpe
    from tasks.lib.model import ScalarModel
    from tasks.lib.template import Template
    from tests.conftest import tiny_raw_params

    raw = tiny_raw_params()
    raw["evaluate"]["samples_per_prompt"] = 2
    raw["evaluate"]["sampling"] = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}
    params = parse_params(raw)
    tok = train_bpe(iter(["What does len do? Return the number of items. Open a file."] * 30), 300, 1)
    t = Template(tok)
    ex = lambda q, a: {"id": q, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    examples = [ex("What does len do?", "Return the number of items."), ex("Open what?", "Open a file.")]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    scorer = ScalarModel(cfg).eval()
    return params, t, scorer, examples, cfg


def test_evaluator_prompts_and_summary_by_hand(evaluator_parts):
    params, t, scorer, examples, _ = evaluator_parts
    ev = evaluate.Evaluator(params, t, scorer, examples, [examples[1], examples[0]], contextlib.nullcontext())
    assert ev.prompt_ids("Q1", chat=True) == t.prompt("Q1")
    shots = "Q: Open what?\nA: Open a file.\n\nQ: What does len do?\nA: Return the number of items.\n\n"
    assert ev.prompt_ids("Q1", chat=False) == [t.eot, *t.text_ids(shots)] + t.text_ids("Q: Q1\nA:")
    out = {"rm": [1.0, 3.0, -1.0, 0.0], "gold": [0.5, 0.1, 0.2, 0.2], "comp_ids": [[1, 2], [1, 2, 3], [4], [4, 5]],
           "texts": ["a b", "a b", "c", "d"], "finished": [True, False, True, True], "entropy": 2.5}
    ref = {"rm": [0.0, 9.0, -1.0, 9.0], "gold": [0.6, 0.0, 0.1, 0.0]}
    m = ev.summary(out, ref)
    assert m["rm_score"] == pytest.approx(0.75) and m["gold_score"] == pytest.approx(0.25)
    assert m["response_length"] == pytest.approx(2.0) and m["finished_share"] == pytest.approx(0.75)
    assert m["distinct_1"] == pytest.approx(5 / 8) and m["mean_token_entropy"] == 2.5
    assert m["self_similarity"] == pytest.approx(0.5)  # prompt 1: identical (1.0); prompt 2: disjoint (0.0)
    # win rates compare the first sample of each prompt: rm 1 > 0 (win), -1 == -1 (tie) -> 0.75; gold 0.5 < 0.6, 0.2 > 0.1 -> 0.5
    assert m["win_rate_vs_sft_rm"] == pytest.approx(0.75) and m["win_rate_vs_sft_gold"] == pytest.approx(0.5)
    assert "win_rate_vs_sft_rm" not in ev.summary(out, None)
    # bigrams (1,2) (1,2) (2,3) (4,5): 3 distinct of 4
    assert m["distinct_2"] == pytest.approx(3 / 4)
    for name, a, b in (("rm", [1.0, -1.0], [0.0, -1.0]), ("gold", [0.5, 0.2], [0.6, 0.1])):
        w = evaluate.win_rate(a, b)
        assert (m[f"win_rate_vs_sft_{name}_ci_low"], m[f"win_rate_vs_sft_{name}_ci_high"]) == (w["ci_low"], w["ci_high"])
    # samples are grouped per prompt (k = 2): prompt 1 identical, prompt 2 identical -> 1.0
    assert ev.summary({**out, "texts": ["a b", "a b", "c", "c"]}, None)["self_similarity"] == pytest.approx(1.0)


def test_evaluator_run_keeps_samples_with_their_prompts(evaluator_parts, monkeypatch):
    from tasks.lib import model as model_lib
    from tasks.lib.model import GPT
    from tasks.lib.rl import rewards_of

    params, t, scorer, examples, cfg = evaluator_parts
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):  # chat: the question's own tokens, then end of turn
        calls.append((len(prompts), max_new_tokens, kw))
        return [p[2:-2][:3] + [t.end_turn] for p in prompts]

    monkeypatch.setattr(model_lib, "generate", fake_generate)
    ev = evaluate.Evaluator(params, t, scorer, examples, [], contextlib.nullcontext())
    model = GPT(cfg).eval()
    out = ev.run(model, chat=True)
    sp = params.evaluate.sampling
    assert [c[0] for c in calls] == [4] and calls[0][1] == sp.max_new_tokens
    kw = calls[0][2]
    assert (kw["pad_id"], kw["stop_ids"], kw["temperature"], kw["top_p"]) == (t.pad, t.stop_ids, sp.temperature, sp.top_p)
    assert int(kw["generator"].initial_seed()) == params.seed
    assert len(out["texts"]) == 4 and all(out["finished"]) and all(c[-1] == t.end_turn for c in out["comp_ids"])
    from tasks.lib.rl import sequences, token_logprobs

    rows = [t.prompt(ex["messages"][0]["content"]) for ex in examples for _ in range(2)]
    x, mask = sequences(rows, [p[2:-2][:3] + [t.end_turn] for p in rows], t.pad, "cpu")
    with torch.no_grad():
        ent = token_logprobs(model, x)[1]
    assert out["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), abs=1e-5)
    for i, ex in enumerate(examples):
        for s in range(2):
            assert ex["messages"][0]["content"].startswith(out["texts"][i * 2 + s])
    want = rewards_of(scorer, [t.scored(t.prompt(examples[1]["messages"][0]["content"]), out["comp_ids"][2], 64)], t.pad).item()
    assert out["rm"][2] == pytest.approx(want, abs=1e-5)
    from tasks.lib.judge import gold_score

    jd = params.judge
    assert out["gold"][3] == pytest.approx(gold_score(out["texts"][3], examples[1]["messages"][1]["content"], True, jd.repetition_penalty, jd.unfinished_penalty))
    blank = t.text_ids("Answer one.\n\nQ: next")

    def doc_generate(model, prompts, max_new_tokens, **kw):  # a document continues past its answer
        return [blank, t.text_ids("no end"), t.text_ids("ends") + [t.eot], []]

    monkeypatch.setattr(model_lib, "generate", doc_generate)
    doc = ev.run(model, chat=False)  # a base model's answer ends at the blank line, or at <|endoftext|>
    assert doc["texts"] == ["Answer one.", "no end", "ends", ""]
    assert doc["finished"] == [True, False, True, False]
    assert doc["comp_ids"][0] == t.text_ids("Answer one.") + [t.end_turn] and doc["comp_ids"][1] == t.text_ids("no end")


def test_sft_examples_longer_than_the_limits_are_dropped():
    from tasks.lib.bpe import train_bpe
    from tasks.lib.instructions import encode_examples
    from tasks.lib.template import Template

    t = Template(train_bpe(iter(["one two three four five six"] * 20), 300, 1))
    mk = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    prompt_len = len(t.prompt("one two")) - 1  # the prompt part of a rendered conversation (no <|assistant|> counted twice)
    items, dropped = encode_examples([mk("one two", "three"), mk("one two three four five six", "x"), mk("one", "two three four five six")],
                                     t, max_prompt=prompt_len + 1, max_response=len(t.text_ids("three")) + 1, max_len=64)
    assert dropped == 2 and len(items) == 1
    ids, mask = items[0]
    assert sum(mask) == len(t.text_ids("three")) + 1
    assert encode_examples([mk("one two", "three")], t, 100, 100, max_len=len(ids) - 1) == ([], 1)
    assert encode_examples([mk("one two", "three")], t, 100, 100, max_len=len(ids))[1] == 0


def test_fingerprint_changes_with_each_part():
    from tasks.lib.train import fingerprint

    base = fingerprint({"lr": 1}, "code", "inputs")
    assert base == fingerprint({"lr": 1}, "code", "inputs") and len(base) == 20
    assert len({base, fingerprint({"lr": 2}, "code", "inputs"), fingerprint({"lr": 1}, "code2", "inputs"),
                fingerprint({"lr": 1}, "code", "inputs2")}) == 4


def test_fingerprint_ignores_key_order_and_takes_paths():
    from pathlib import PurePosixPath

    from tasks.lib.train import fingerprint

    assert fingerprint({"a": 1, "b": 2}, "c", "i") == fingerprint({"b": 2, "a": 1}, "c", "i")
    assert fingerprint({"p": PurePosixPath("x/y")}, "c", "i") == fingerprint({"p": "x/y"}, "c", "i")


def test_sft_example_with_an_empty_answer_is_kept_and_one_without_an_answer_dropped():
    from tasks.lib.bpe import train_bpe
    from tasks.lib.instructions import encode_examples
    from tasks.lib.template import Template

    t = Template(train_bpe(iter(["one two three four five six"] * 20), 300, 1))
    empty = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": ""}]}
    no_answer = {"messages": [{"role": "user", "content": "one"}]}
    items, dropped = encode_examples([empty, no_answer], t, 100, 100, 64)
    assert dropped == 1 and len(items) == 1
    ids, mask = items[0]
    assert ids[-1] == t.end_turn and sum(mask) == 1  # the model learns to end its turn at once


def test_evaluator_run_batches_cuts_long_prompts_and_scores_unfinished_answers(evaluator_parts, monkeypatch):
    """One prompt per batch still gives every sample; a prompt longer than the context minus
    the answer is cut from the start (for the policy and for the reward model); an empty or
    unended chat answer is unfinished, and the judge is told so."""
    from tasks.lib import model as model_lib
    from tasks.lib.judge import gold_score
    from tasks.lib.model import GPT

    params, t, scorer, examples, cfg = evaluator_parts
    # judge settings other than gold_score's defaults, so passing them on is checked
    params = params.model_copy(update={"judge": params.judge.model_copy(update={"repetition_penalty": 0.9, "unfinished_penalty": 0.7})})
    long_q = " ".join(["What does len do?"] * 30)  # far more tokens than the 64-token context
    examples = [examples[0], {"id": "long", "messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "Open a file."}]}]
    model = GPT(cfg).eval()
    seen = []
    answers = iter([[], t.text_ids("Return the") + [t.end_turn], t.text_ids("Open a"), [t.end_turn]])

    def fake_generate(m, prompts, max_new_tokens, **kw):
        seen.append((m is model, [list(p) for p in prompts]))
        return [next(answers) for _ in prompts]

    monkeypatch.setattr(model_lib, "generate", fake_generate)
    ev = evaluate.Evaluator(params, t, scorer, examples, [], contextlib.nullcontext())
    out = ev.run(model, chat=True, batch=1)
    assert len(seen) == 4 and all(same for same, _ in seen) and [len(p) for _, p in seen] == [1, 1, 1, 1]
    limit = cfg.max_seq_len - params.evaluate.sampling.max_new_tokens
    full = t.prompt(long_q)
    assert len(full) > cfg.max_seq_len and seen[2][1][0] == full[-limit:]
    assert out["finished"] == [False, True, False, True] and out["texts"] == ["", "Return the", "Open a", ""]
    jd = params.judge
    assert out["gold"][2] == pytest.approx(gold_score("Open a", "Open a file.", False, jd.repetition_penalty, jd.unfinished_penalty))
    assert out["gold"][2] != pytest.approx(gold_score("Open a", "Open a file.", True, jd.repetition_penalty, jd.unfinished_penalty))
    from tasks.lib.rl import rewards_of

    want = rewards_of(scorer, [t.scored(full, t.text_ids("Open a"), cfg.max_seq_len)], t.pad).item()
    assert out["rm"][2] == pytest.approx(want, abs=1e-5)


def test_select_prompts_keeps_a_prompt_exactly_at_the_limit(evaluator_parts):
    _, t, _, examples, _ = evaluator_parts
    n = len(t.prompt(examples[0]["messages"][0]["content"]))
    assert n != len(t.prompt(examples[1]["messages"][0]["content"]))
    at_limit = evaluate.select_prompts(examples, t, n, 10, seed=0)
    assert examples[0] in at_limit
    assert examples[0] not in evaluate.select_prompts(examples, t, n - 1, 10, seed=0)
