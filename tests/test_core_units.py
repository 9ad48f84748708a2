"""Hand-computed values for the helpers of training and evaluation: the learning-rate
schedule, the resume state, metric replay into MLflow, the divergence guard, prompt splits
and samples, SFT batches, the judge and the evaluation metrics."""

import json
import math

import pytest
import torch

from tasks.lib import instructions, judge, train
from tasks.lib.model import GPT, ModelConfig
from tests.conftest import train_cfg

TINY = ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, max_seq_len=32)


def test_learning_rate_schedule_by_hand():
    cfg = train_cfg(10, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [train.lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from 1.0 at step 4 to 0.1 at step 10: progress (s - 4) / 6
    for s in (4, 6, 7, 10, 12):
        p = min((s - 4) / 6, 1.0)
        assert train.lr_at(s, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * p)))
    flat = train_cfg(3, lr=0.5, warmup_steps=0, min_lr_ratio=1.0)
    assert [train.lr_at(s, flat) for s in range(3)] == pytest.approx([0.5, 0.5, 0.5])


def test_optimizer_decays_matrices_only():
    model = GPT(TINY)
    opt = train.make_optimizer(model, train_cfg(1, weight_decay=0.3, beta1=0.8, beta2=0.9, lr=0.01), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()  # the tied weight once
    assert decay["betas"] == (0.8, 0.9) and decay["lr"] == 0.01


def test_resume_state_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    a, b = GPT(TINY), GPT(TINY)
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1)
    a(torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8)))[1].backward()
    opt_a.step()
    extra = {"w": {"t": torch.arange(3.0)}}
    train.save_state(tmp_path / "ck", {"model": a}, {"model": opt_a}, {"step": 7, "fingerprint": "f1", "curve": [{"step": 1}]}, extra=extra)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors", "optimizer.pt", "state.json", "w.safetensors"]
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1)
    assert train.load_state(tmp_path / "ck", {"model": b}, {"model": opt_b}, "other") is None  # another run's checkpoint
    assert not torch.equal(a.tok.weight, b.tok.weight)
    state = train.load_state(tmp_path / "ck", {"model": b}, {"model": opt_b}, "f1")
    assert state["step"] == 7 and state["curve"] == [{"step": 1}]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert opt_b.state_dict()["state"][0]["step"] == opt_a.state_dict()["state"][0]["step"]
    assert train.load_state(tmp_path / "none", {"model": b}, {"model": opt_b}, "f1") is None
    (tmp_path / "ck/optimizer.pt").write_bytes(b"torn")  # unreadable: reported, removed, None
    assert train.load_state(tmp_path / "ck", {"model": b}, {"model": opt_b}, "f1") is None
    assert not (tmp_path / "ck").exists()


def test_divergence_guard():
    model = GPT(TINY)
    train.check_finite(model, "ok")
    with torch.no_grad():
        model.blocks[0].fc.weight[0, 0] = float("nan")
    with pytest.raises(train.DivergenceError, match=r"bad: non-finite weights in \['blocks.0.fc.weight'\]"):
        train.check_finite(model, "bad")


def test_a_diverging_loop_stops_and_writes_nothing(tmp_path):
    from tests.conftest import runtime

    x = torch.randint(0, 40, (2, 9))
    with pytest.raises(train.DivergenceError, match="at step 1"):
        train.train_loop("t", GPT(TINY), train_cfg(3), runtime(), lambda s, m: x,
                         lambda m, b: (m(b[:, :-1], b[:, 1:])[1] * float("inf"), {}), lambda b: b.numel(), tmp_path / "ck", "fp")
    assert not (tmp_path / "ck").exists()


def test_a_gradient_that_is_not_finite_stops_the_loop_even_when_the_loss_is(tmp_path):
    from tests.conftest import runtime

    def loss_fn(m, b):  # sqrt(|w - w|): the loss is 0, its gradient is not finite
        w = m.blocks[0].fc.weight
        return torch.sqrt((w - w.detach()).abs()).sum(), {}

    x = torch.randint(0, 40, (2, 9))
    with pytest.raises(train.DivergenceError, match="at step 1"):
        train.train_loop("t", GPT(TINY), train_cfg(3), runtime(), lambda s, m: x, loss_fn, lambda b: b.numel(), tmp_path / "ck", "fp")


def test_a_step_is_read_back_after_the_next_is_queued_and_at_once_before_a_checkpoint(tmp_path, monkeypatch):
    """The host never waits for the device inside the loop: step s's loss is read (and logged)
    only after step s + 1's forward pass has been queued, except before a checkpoint or an
    evaluation and at the end, where every pending step is read (and checked) first."""
    from tests.conftest import runtime

    events = []
    monkeypatch.setattr(train.Reporter, "log", lambda self, step, metrics: events.append(("log", step + 1)))
    x = torch.randint(0, 40, (2, 9))

    def loss_fn(m, b):
        events.append(("forward", len([e for e in events if e[0] == "forward"]) + 1))
        return m(b[:, :-1], b[:, 1:])[1], {}

    train.train_loop("t", GPT(TINY), train_cfg(5, ckpt_every=3, eval_every=100), runtime(), lambda s, m: x, loss_fn,
                     lambda b: b.numel(), tmp_path / "ck", "fp")
    assert events == [("forward", 1), ("forward", 2), ("log", 1), ("forward", 3), ("log", 2), ("log", 3),  # checkpoint at 3
                      ("forward", 4), ("forward", 5), ("log", 4), ("log", 5)]


def test_instruction_splits_repeat_with_the_seed():
    from tests.conftest import cfg as section

    c = section("instructions", sources=[{"name": "python_qa", "kind": "builtin", "corpus": "python_qa", "limit": 60}])
    a, b, other = instructions.splits(c, 0), instructions.splits(c, 0), instructions.splits(c, 1)
    assert a == b and sum(map(len, a.values())) == 60
    questions = lambda s: [ex["messages"][0]["content"] for part in s.values() for ex in part]  # noqa: E731
    assert questions(a) != questions(other)  # the seed picks the question wording


def test_metrics_of_a_resumed_run_are_replayed_into_its_mlflow_run():
    import mlflow

    from tasks.lib.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("test-replay")
    with mlflow.start_run() as run:
        rep = train.Reporter("t", 10, main=True, every_s=0.0)
        rep.replay([{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.5, "lr": float("nan")}])
        rep.log(2, {"loss": 1.0, "tokens_per_s": 5.0})
    client = mlflow.MlflowClient()
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert hist == {1: 2.0, 2: 1.5, 3: 1.0}  # log(step=2) is the third step done
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == [1]  # NaN is not logged
    assert train.Reporter("t", 10, main=False).mlflow is None



def test_progress_line_rate_and_eta_count_the_steps_timed(monkeypatch, caplog):
    """Steps of 2 s each on a clock the test sets: the rate is 0.5 steps/s, the ETA the steps
    left at that rate; the clock starts at the end of the first logged step (a resumed run's
    first step here is 3), so that step is not counted as done in no time."""
    now = [100.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])
    rep = train.Reporter("t", 10, main=False)
    rep.main, rep.every_s = True, 0.0  # progress lines without an MLflow run
    with caplog.at_level("INFO", logger=train.log.name):
        for step in range(3, 10):
            now[0] += 2.0  # the step's time
            rep.log(step, {"loss": 1.0})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith("step 4/10 | loss 1 | timing from the next step")
    assert lines[1].endswith("step 5/10 | loss 1 | 0.50 steps/s | ETA 0m10s")  # 5 steps left at 2 s
    assert lines[-1].endswith("step 10/10 | loss 1 | 0.50 steps/s | ETA 0m00s")

def test_prompt_splits_by_hand():
    split = {"a": 0.5, "b": 0.25, "c": 0.25}
    from tasks.lib.hashing import unit_interval

    for i in range(50):
        h = unit_interval(f"id{i}", "instructions:")
        want = "a" if h < 0.5 else "b" if h < 0.75 else "c"
        assert instructions.split_of(f"id{i}", split) == want
    assert instructions.split_of("x", {"only": 2.0}) == "only"
    counts = {k: 0 for k in split}
    for i in range(4000):
        counts[instructions.split_of(f"e{i}", split)] += 1
    assert abs(counts["a"] / 4000 - 0.5) < 0.03 and abs(counts["c"] / 4000 - 0.25) < 0.03


def test_sample_and_coverage_by_hand():
    exs = [{"id": f"python_qa/{m}.f{i}"} for m in ("json", "os", "zlib") for i in range(3)] + [{"id": "python_qa/topic/async"}]
    from tasks.lib.hashing import unit_interval

    picked = instructions.sample(exs, 4, seed=3, salt="s")
    assert picked == sorted(exs, key=lambda e: unit_interval(e["id"], "s:3:"))[:4]
    assert instructions.sample(exs, 100, 3, "s") == sorted(exs, key=lambda e: unit_interval(e["id"], "s:3:"))
    # a topic's group is the id's last part ("async"), not "topic/async"
    assert instructions.coverage(exs) == {"examples": 10, "groups": 4, "first_group": "async", "last_group": "zlib"}
    assert instructions.coverage([]) == {"examples": 0, "groups": 0, "first_group": None, "last_group": None}


def test_instruction_files_found_in_subfolders_and_read_from_jsonl_and_parquet(tmp_path):
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a/b/c").mkdir(parents=True)
    one = {"id": "j1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "a/b/c/deep.jsonl").write_text(json.dumps(one) + "\n\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{**one, "id": "p1"}]), tmp_path / "a/top.parquet")
    src = SimpleNamespace(kind="files", name="mine", globs=[str(tmp_path / "a/**/*.jsonl"), str(tmp_path / "a/*.parquet")])
    assert [r["id"] for r in instructions._records(src)] == ["j1", "p1"]  # sorted by path: a/b/c/deep.jsonl (two levels under **) < a/top.parquet


def test_python_qa_records_are_user_question_then_assistant_answer():
    recs = list(instructions.python_qa(None, 0))
    topics = [r for r in recs if r["id"].startswith("python_qa/topic/")]
    assert topics and len(topics) < len(recs)
    for r in recs:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and all(m["content"] for m in r["messages"]), r
    name = topics[0]["id"].rsplit("/", 1)[1]
    assert topics[0]["messages"][0]["content"] == f"Explain {name} in Python."
    # a topic is answered by its first prose paragraph, not by its title and the title's underline
    answers = {r["id"]: r["messages"][1]["content"] for r in topics}
    assert answers["python_qa/topic/pass"].startswith('"pass" is a null operation')
    assert not any("***" in a or a.startswith("New in version") for a in answers.values())


def test_topic_opening_skips_title_grammar_and_version_notes_and_keeps_four_words(monkeypatch):
    import pydoc_data.topics

    text = 'The "x" statement\n*****************\n\n   x_stmt ::= "x"\n\nNew in version 3.5.\n\nOne two\nthree four.\n\nMore.'
    assert instructions.topic_opening(text) == "One two three four."
    assert instructions.topic_opening("Title\n=====\n\n   only code\n") == ""
    monkeypatch.setattr(pydoc_data.topics, "topics", {"four": text, "three": "T\n*\n\nOne two three."})
    monkeypatch.setattr(instructions.corpora, "stdlib_docstrings", lambda: [])
    recs = [r for r in instructions.python_qa(None, 0) if r["id"].startswith("python_qa/topic/")]
    assert [(r["id"], r["messages"][1]["content"]) for r in recs] == [("python_qa/topic/four", "One two three four.")]


def test_sft_batch_by_hand():
    x, y, m = instructions.masked_batch([([1, 2, 3, 4], [False, False, True, True]), ([5, 6], [False, True])], pad_id=0)
    assert x.tolist() == [[1, 2, 3], [5, 0, 0]] and y.tolist() == [[2, 3, 4], [6, 0, 0]]
    assert m.tolist() == [[False, True, True], [True, False, False]]
    assert x.dtype == torch.long and y.dtype == torch.long


def test_common_formats_by_hand():
    assert instructions.to_messages({"prompt": "q", "completion": "a"}) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert instructions.to_messages({"messages": [{"role": "user", "content": 3}]}) is None
    assert instructions.to_messages({"messages": []}) is None
    assert instructions.to_messages({"prompt": "q"}) is None


def test_repetition_by_hand():
    assert judge.repetition("a b c a b c") == pytest.approx(1 - 3 / 4)  # trigrams abc bca cab abc: 3 distinct of 4
    assert judge.repetition("a b") == 0.0
    assert judge.repetition("A, b; c") == 0.0 and judge.repetition("x x x x") == pytest.approx(1 - 1 / 2)


def test_self_similarity_edges():
    from tasks.evaluate import self_similarity

    assert self_similarity([["A b", "a B"]]) == 1.0  # case does not matter
    assert self_similarity([["", ""]]) == 1.0 and self_similarity([]) == 0.0 and self_similarity([["a"]]) == 0.0


def test_train_loop_follows_the_schedule_and_records_each_step(tmp_path):
    """The optimizer takes the scheduled learning rate at every step (Adam's first update moves
    each parameter by exactly lr), the curve has one row per step with that lr, evaluations
    land on their steps, and first_loss is the first step's."""
    from tests.conftest import runtime

    torch.manual_seed(0)
    x = torch.randint(0, 40, (2, 9))
    cfg = train_cfg(1, lr=0.01, warmup_steps=4, weight_decay=0.0, grad_clip=1e9)
    model = GPT(TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, hist = train.train_loop("t", model, cfg, runtime(), lambda s, m: x, lambda m, b: (m(b[:, :-1], b[:, 1:])[1], {}),
                                   lambda b: b.numel(), tmp_path / "a", "fp")
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.dim() == 1)
    assert moved == pytest.approx(train.lr_at(0, cfg), rel=1e-3) and train.lr_at(0, cfg) == pytest.approx(0.0025)

    seen = []
    cfg = train_cfg(7, lr=0.01, warmup_steps=2, eval_every=3)
    model, hist = train.train_loop("t", GPT(TINY), cfg, runtime(), lambda s, m: x, lambda m, b: (m(b[:, :-1], b[:, 1:])[1], {}),
                                   lambda b: b.numel(), tmp_path / "b", "fp", eval_fn=lambda m, step: seen.append(step) or {"acc": step / 10},
                                   on_step=lambda s: seen.append(("step", s)))
    assert [r["step"] for r in hist["curve"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["lr"] for r in hist["curve"]] == pytest.approx([train.lr_at(s, cfg) for s in range(7)])
    # every eval_every steps and after the last; eval_fn gets the index of the step just taken
    # (0-based), the record counts steps from 1
    assert [e["step"] for e in hist["evals"]] == [3, 6, 7] and [e["acc"] for e in hist["evals"]] == pytest.approx([0.2, 0.5, 0.6])
    assert hist["first_loss"] == hist["curve"][0]["loss"]
    assert [s for s in seen if isinstance(s, tuple)] == [("step", k) for k in range(1, 8)]


def test_flops_per_token_and_an_inverse_cdf_draw_by_hand():
    from tasks.lib.model import _draw

    model = GPT(TINY)
    # 6 N (N: the non-embedding weights plus the head's matmul, V x d) + 12 L d T for the attention scores
    want = 6 * (model.num_params(non_embedding=True) + 40 * 16) + 12 * 1 * 16 * 32
    assert model.flops_per_token() == want and model.flops_per_token(8) == want - 12 * 16 * 24
    # a draw at u = 0 never picks a token of weight 0; u just below a boundary stays on its side
    w = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 2.0]])
    assert _draw(w, torch.tensor([[0.0], [0.0]])).tolist() == [[1], [0]]
    assert _draw(w, torch.tensor([[0.2499], [0.5]])).tolist() == [[1], [2]]
