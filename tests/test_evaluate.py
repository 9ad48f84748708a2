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


def cmp(win_low: float, diff_low: float = 0.1, win: float | None = None) -> dict:
    """A paired comparison as tasks.lib.compare.compare returns it."""
    win = win if win is not None else win_low + 0.05
    return {"win_rate": win, "win_ci_low": win_low, "win_ci_high": min(win + 0.05, 1.0), "diff": diff_low + 0.05,
            "diff_ci_low": diff_low, "diff_ci_high": diff_low + 0.1, "prompts": 300}


@pytest.mark.parametrize("vs, margin, promote", [
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6), "champion": None}, 0.0, True),   # no champion yet: the rule still holds
    ({"sft": cmp(0.45), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6), "champion": None}, 0.0, False),  # loses to SFT, no champion: not promoted
    ({"sft": cmp(0.50), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6), "champion": None}, 0.0, False),  # a bound of exactly 0.5 is not a win
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.49), "constant": cmp(0.6), "champion": None}, 0.0, False),  # sharpened SFT is as good
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6, diff_low=-0.01), "champion": None}, 0.0, False),  # not above the constant answer
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6), "champion": cmp(0.51)}, 0.0, True),
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.52), "constant": cmp(0.6), "champion": cmp(0.48)}, 0.0, False),
    ({"sft": cmp(0.55), "sft_best_temperature": cmp(0.56), "constant": cmp(0.6), "champion": cmp(0.54)}, 0.05, False),  # margin on the champion
    ({"sft": cmp(0.56), "sft_best_temperature": cmp(0.56), "constant": cmp(0.6), "champion": cmp(0.56)}, 0.05, True),
])
def test_promotion_rule(vs, margin, promote):
    ok, reason = evaluate.decide(vs, margin)
    assert ok is promote
    assert ("no champion yet" in reason) is (vs["champion"] is None) and "vs sft" in reason and "constant" in reason


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
    """In a real registry: a candidate that loses to SFT, or to the constant answer, is not
    promoted even with no champion; a winner is; a later winner must beat the champion too,
    re-measured; the decision and its numbers land on the version's tags."""
    from types import SimpleNamespace

    name, (v1, v2, v3) = registered
    pr = SimpleNamespace(model=name, min_margin=0.0)
    seen = []

    def champion(result):
        def measure(model, version):
            seen.append((model, version))
            return result
        return measure

    good = {"sft": cmp(0.55), "sft_best_temperature": cmp(0.53), "constant": cmp(0.9)}
    loses_to_sft = {**good, "sft": cmp(0.40)}
    below_constant = {**good, "constant": cmp(0.9, diff_low=-0.02)}
    run = lambda version, vs, result=None: evaluate.promote(pr, {"rlhf": version}, {}, {"rlhf": vs}, champion(result))  # noqa: E731

    assert registry.alias_version(name, "champion") is None
    first = run(v1, loses_to_sft)
    assert first["decision"] == "challenger" and registry.alias_version(name, "champion") is None
    assert registry.alias_version(name, "challenger") == v1 and "vs sft 0.450 [0.400" in first["reason"]
    assert run(v1, below_constant)["decision"] == "challenger" and registry.alias_version(name, "champion") is None
    assert seen == []  # no champion: nothing re-measured
    ok = run(v1, good)
    assert ok["decision"] == "champion" and registry.alias_version(name, "champion") == v1 and ok["vs_champion"] is None
    assert {k: ok[k] for k in ("model", "candidate", "candidate_version", "champion_version")} == {
        "model": name, "candidate": "rlhf", "candidate_version": v1, "champion_version": None}
    tags = mlflow_client().get_model_version(name, v1).tags
    assert tags["promotion.decision"] == "champion" and tags["promotion.vs_sft.win_ci_low"] == "0.55"
    assert run(v1, good)["decision"] == "unchanged" and seen == []  # the champion is not measured against itself
    better = run(v2, good, cmp(0.5234567))
    assert better["decision"] == "champion" and registry.alias_version(name, "champion") == v2 and seen == [("rlhf", v1)]
    assert mlflow_client().get_model_version(name, v2).tags["promotion.vs_champion.win_ci_low"] == "0.523457"  # 6 places
    tie = run(v3, good, cmp(0.50))  # no better than the champion: challenger
    assert tie["decision"] == "challenger" and registry.alias_version(name, "champion") == v2 and registry.alias_version(name, "challenger") == v3
    none = evaluate.promote(pr, {"rlhf": None}, {}, {"rlhf": good}, champion(cmp(0.9)))
    assert none["decision"] == "none" and registry.alias_version(name, "champion") == v2  # an unregistered checkpoint is never promoted
    # of several aligned candidates, the one with the best win rate against SFT competes
    two = evaluate.promote(pr, {"a": v3, "b": v1}, {}, {"a": good, "b": {**good, "sft": cmp(0.6)}}, champion(cmp(0.1)))
    assert two["candidate"] == "b" and two["decision"] == "challenger"


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
    assert lengths[1] <= 3 < lengths[12]  # one token re-encodes as up to 3 when it holds part of a character
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
    from tasks.lib.judge import Judge
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
    corpus = [(e["messages"][0]["content"], e["messages"][1]["content"]) for e in examples] + [("Close it?", "Close the file object.")]
    judge = Judge(corpus, params.judge.repetition_penalty, params.judge.unfinished_penalty, 2)
    return params, t, scorer, judge, examples, cfg


def test_evaluator_prompts_and_summary_by_hand(evaluator_parts):
    import numpy as np

    params, t, scorer, judge, examples, _ = evaluator_parts
    ev = evaluate.Evaluator(params, t, scorer, judge, examples, [examples[1], examples[0]], contextlib.nullcontext())
    assert ev.prompt_ids("Q1", chat=True) == t.prompt("Q1")
    shots = "Q: Open what?\nA: Open a file.\n\nQ: What does len do?\nA: Return the number of items.\n\n"
    assert ev.prompt_ids("Q1", chat=False) == [t.eot, *t.text_ids(shots)] + t.text_ids("Q: Q1\nA:")
    out = {"rm": np.array([[1.0, 3.0], [-1.0, 0.0]]), "gold": np.array([[0.5, 0.1], [0.2, 0.2]]), "comp_ids": [[1, 2], [1, 2, 3], [4], [4, 5]],
           "texts": ["a b", "a b", "c", "d"], "finished": [True, False, True, True], "entropy": 2.5, "samples": 2}
    m = ev.summary(out)
    assert m["rm_score"] == pytest.approx(0.75) and m["gold_score"] == pytest.approx(0.25)
    assert m["response_length"] == pytest.approx(2.0) and m["finished_share"] == pytest.approx(0.75)
    assert m["distinct_1"] == pytest.approx(5 / 8) and m["mean_token_entropy"] == 2.5
    assert m["self_similarity"] == pytest.approx(0.5)  # prompt 1: identical (1.0); prompt 2: disjoint (0.0)
    assert m["distinct_2"] == pytest.approx(3 / 4)  # bigrams (1,2) (1,2) (2,3) (4,5): 3 distinct of 4
    # samples are grouped per prompt (k = 2): prompt 1 identical, prompt 2 identical -> 1.0
    assert ev.summary({**out, "texts": ["a b", "a b", "c", "c"]})["self_similarity"] == pytest.approx(1.0)
    # a baseline: one finished answer per prompt, judged and scored by the RM like a model's
    b = ev.baseline(["Return the number of items.", "Close the file object."])
    assert b["gold"].shape == (2, 1) and b["samples"] == 1 and "self_similarity" not in ev.summary(b)
    assert ev.summary(b)["finished_share"] == 1.0  # the baselines' answers end their turn
    assert b["gold"][:, 0] == pytest.approx(judge.scores(b["texts"], ev.questions, ev.references, [True, True]))
    from tasks.lib.rl import rewards_of

    want = rewards_of(scorer, [t.scored(t.prompt(ev.questions[1]), t.text_ids("Close the file object.") + [t.end_turn], 64)], t.pad)
    assert b["rm"][1, 0] == pytest.approx(float(want[0]), abs=1e-5)


def test_best_constant_is_the_argmax_over_the_candidates():
    from tasks.lib.judge import Judge

    corpus = [("What is alpha?", "alpha beta gamma"), ("What is delta?", "beta delta"), ("Explain zeta.", "beta epsilon zeta")]
    j = Judge(corpus, 0.5, 0.3, 2)
    qs, rs = [q for q, _ in corpus], [r for _, r in corpus]
    # by hand (tests/test_judge.py): "gamma" scores 1/9 on average, "beta" 0, "delta epsilon" below
    text, score = evaluate.best_constant(j, ["beta", "gamma", "gamma", "delta epsilon"], qs, rs)
    assert text == "gamma" and score == pytest.approx(1 / 9)
    assert evaluate.best_constant(j, ["beta", "beta beta"], qs, rs)[0] == "beta"  # a tie: the first in sorted order


def test_evaluator_run_keeps_samples_with_their_prompts(evaluator_parts, monkeypatch):
    from tasks.lib import model as model_lib
    from tasks.lib.model import GPT
    from tasks.lib.rl import rewards_of

    params, t, scorer, judge, examples, cfg = evaluator_parts
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):  # chat: the question's own tokens, then end of turn
        calls.append((len(prompts), max_new_tokens, kw))
        out = [p[2:-2][:3] + [t.end_turn] for p in prompts]
        kw["entropy"].extend(float(i) for i, o in enumerate(out) for _ in o)  # per token: its row's number
        return out

    monkeypatch.setattr(model_lib, "generate", fake_generate)
    ev = evaluate.Evaluator(params, t, scorer, judge, examples, [], contextlib.nullcontext())
    model = GPT(cfg).eval()
    out = ev.run(model, chat=True)
    sp = params.evaluate.sampling
    assert [c[0] for c in calls] == [4] and calls[0][1] == sp.max_new_tokens
    kw = calls[0][2]
    assert (kw["pad_id"], kw["stop_ids"], kw["temperature"], kw["top_p"]) == (t.pad, t.stop_ids, sp.temperature, sp.top_p)
    assert int(kw["generator"].initial_seed()) == params.seed
    assert len(out["texts"]) == 4 and all(out["finished"]) and all(c[-1] == t.end_turn for c in out["comp_ids"])
    assert out["gold"].shape == (2, 2) and out["rm"].shape == (2, 2)
    lengths = [len(t.prompt(ex["messages"][0]["content"])[2:-2][:3]) + 1 for ex in examples for _ in range(2)]
    assert out["entropy"] == pytest.approx(sum(i * n for i, n in enumerate(lengths)) / sum(lengths))  # the mean over every token
    for i, ex in enumerate(examples):
        for s in range(2):
            assert ex["messages"][0]["content"].startswith(out["texts"][i * 2 + s])
    want = rewards_of(scorer, [t.scored(t.prompt(examples[1]["messages"][0]["content"]), out["comp_ids"][2], 64)], t.pad).item()
    assert out["rm"][1, 0] == pytest.approx(want, abs=1e-5)
    assert out["gold"][1, 1] == pytest.approx(judge.score(out["texts"][3], examples[1]["messages"][0]["content"],
                                                          examples[1]["messages"][1]["content"], True))
    # another temperature and sample count reach the sampler
    calls.clear()
    greedy = ev.run(model, chat=True, temperature=0.0, samples=1)
    assert calls[0][0] == 2 and calls[0][2]["temperature"] == 0.0 and greedy["gold"].shape == (2, 1)
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
    from tasks.lib.judge import Judge
    from tasks.lib.model import GPT

    params, t, scorer, _, examples, cfg = evaluator_parts
    long_q = " ".join(["What does len do?"] * 30)  # far more tokens than the 64-token context
    examples = [examples[0], {"id": "long", "messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "Open a file."}]}]
    judge = Judge([(e["messages"][0]["content"], e["messages"][1]["content"]) for e in examples] + [("x?", "Close it.")], 0.9, 0.7, 2)
    model = GPT(cfg).eval()
    seen = []
    answers = iter([[], t.text_ids("Return the") + [t.end_turn], t.text_ids("Open a"), [t.end_turn]])

    def fake_generate(m, prompts, max_new_tokens, **kw):
        seen.append((m is model, [list(p) for p in prompts]))
        return [next(answers) for _ in prompts]

    monkeypatch.setattr(model_lib, "generate", fake_generate)
    ev = evaluate.Evaluator(params, t, scorer, judge, examples, [], contextlib.nullcontext())
    out = ev.run(model, chat=True, batch=1)
    assert len(seen) == 4 and all(same for same, _ in seen) and [len(p) for _, p in seen] == [1, 1, 1, 1]
    limit = cfg.max_seq_len - params.evaluate.sampling.max_new_tokens
    full = t.prompt(long_q)
    assert len(full) > cfg.max_seq_len and seen[2][1][0] == full[-limit:]
    assert out["finished"] == [False, True, False, True] and out["texts"] == ["", "Return the", "Open a", ""]
    assert out["gold"][1, 0] == pytest.approx(judge.score("Open a", long_q, "Open a file.", False))
    assert out["gold"][1, 0] == pytest.approx(judge.score("Open a", long_q, "Open a file.", True) - 0.7)
    from tasks.lib.rl import rewards_of

    want = rewards_of(scorer, [t.scored(full, t.text_ids("Open a"), cfg.max_seq_len)], t.pad).item()
    assert out["rm"][1, 0] == pytest.approx(want, abs=1e-5)


def test_select_prompts_keeps_a_prompt_exactly_at_the_limit(evaluator_parts):
    _, t, _, _, examples, _ = evaluator_parts
    n = len(t.prompt(examples[0]["messages"][0]["content"]))
    assert n != len(t.prompt(examples[1]["messages"][0]["content"]))
    assert examples[0] in evaluate.select_prompts(examples, t, n, seed=0)
    assert examples[0] not in evaluate.select_prompts(examples, t, n - 1, seed=0)
    assert len(evaluate.select_prompts(examples, t, 1000, seed=0)) == 2  # every usable prompt
