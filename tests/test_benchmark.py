"""lm-evaluation-harness on this project's models: a tiny model trained on a planted text
scores the local multiple-choice and generation tasks shipped in tests/data/lm_eval through
lm-eval's own request building and metrics, and the figures equal this project's direct
computation (tasks/lib/scoring.py, the model's generate); the rolling log-likelihood equals a
hand-made windowing; the `python -m tasks.benchmark` tool on the built-in task, with bad
input, and recording into a registered version's MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import torch

from tests.conftest import REPO

DATA = REPO / "tests/data/lm_eval"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A one-layer model overfit on the right answers of both tasks, saved as a checkpoint."""
    from tasks.lib.bpe import train_bpe
    from tasks.lib.model import GPT, ModelConfig, save_checkpoint
    from tasks.lib.template import Template

    texts = [f"Q: {r['question']}\nA: {r['choices'][r['answer']]}\n\n" for r in rows("tiny_mc")]
    texts += [f"What does {r['question']} do? {r['answer']}.\n" for r in rows("tiny_gen")]
    tok = train_bpe(iter(texts * 20), 400, 1)
    t = Template(tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=64, max_seq_len=64))
    seqs = [[t.eot, *t.text_ids(x)] for x in texts]
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), t.pad)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    mask = x[:, 1:] != t.pad
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(x[:, :-1], x[:, 1:], loss_mask=mask)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("planted") / "ckpt"
    (folder.parent / "tok").mkdir()
    tok.save(str(folder.parent / "tok/tokenizer.json"))
    save_checkpoint(folder, model.eval(), folder.parent / "tok", {"chat": False})
    return model.eval(), tok, folder


def test_lm_eval_scores_the_local_tasks_as_the_project_computes_them(planted, monkeypatch):
    from tasks.lib.harness import PipelineLM, evaluate_tasks
    from tasks.lib.model import generate
    from tasks.lib.scoring import multiple_choice
    from tasks.lib.template import Template

    monkeypatch.chdir(REPO)  # the task files name their data relative to the project
    model, tok, _ = planted
    t = Template(tok)
    res = evaluate_tasks(PipelineLM(model, tok), ["tiny_mc", "tiny_gen"], include_path=DATA)
    items = [{"context": f"Q: {r['question']}\nA:", "choices": r["choices"], "gold": r["answer"]} for r in rows("tiny_mc")]
    direct = multiple_choice(model, tok, items, [t.eot], t.text_ids, t.pad)
    assert res["tiny_mc"]["acc"] == direct["acc"] and res["tiny_mc"]["acc_norm"] == direct["acc_norm"]
    assert direct["acc"] >= 5 / 6  # the planted answers are known (chance: 1/4)
    hits = 0
    for r in rows("tiny_gen"):
        out = t.decode(generate(model, [[t.eot, *t.text_ids(f"What does {r['question']} do?")]], 8, pad_id=t.pad, stop_ids=(t.eot,), temperature=0.0)[0])
        cut = min([out.index(s) for s in ("\n", ".") if s in out], default=len(out))
        hits += out[:cut] == " " + r["answer"]
    assert res["tiny_gen"]["exact_match"] == hits / 4 and hits >= 3


def test_rolling_loglikelihood_predicts_every_token_once(planted):
    import math
    from types import SimpleNamespace

    from tasks.lib.harness import PipelineLM
    from tasks.lib.scoring import continuation_logprobs
    from tasks.lib.template import Template

    model, tok, _ = planted
    t = Template(tok)
    lm = PipelineLM(model, tok)
    short = "Q: What does `len` do?"
    long = " ".join(["Return the number of items in a container."] * 12)  # longer than the 64-token context
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(short,)), SimpleNamespace(args=(long,))])
    assert got[0] == pytest.approx(continuation_logprobs(model, [([t.eot], t.text_ids(short))], t.pad)[0][0], abs=1e-4)
    ids = t.text_ids(long)
    assert len(ids) > 64
    # by hand: the first 64 tokens after <|endoftext|>, then each next block of (up to) 64 with
    # as much preceding context as fits
    total, start = 0.0, 0
    while start < len(ids):
        cont = ids[start : start + 64]
        ctx = ([t.eot] + ids)[: start + 1][-(64 - len(cont) + 1) :]  # together 65 tokens: 64 inputs
        total += continuation_logprobs(model, [(ctx, cont)], t.pad)[0][0]
        start += len(cont)
    assert got[1] == pytest.approx(total, abs=1e-3) and math.isfinite(got[1])


def test_benchmark_tool_on_the_builtin_task_and_bad_input(planted, tmp_path):
    import yaml

    from tests.conftest import tiny_raw_params

    _, _, folder = planted
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw_params()))
    out = tmp_path / "res.json"
    res = subprocess.run([sys.executable, "-m", "tasks.benchmark", "--checkpoint", str(folder), "--params", str(params), "--limit", "6",
                          "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "doc_match: acc " in res.stdout and "(chance 0.250)" in res.stdout
    assert 0.0 <= json.loads(out.read_text())["doc_match"]["acc"] <= 1.0



@pytest.mark.parametrize("args, msg", [(["--include", "nope", "--tasks", "x"], "does not exist"),
                                       (["--include", str(DATA), "--tasks", "no_such_task"], "unknown benchmark task"),
                                       (["--limit", "-1"], "--limit > 0"), (["--model", "models:/no-such-model@champion"], "no registered model")])
def test_benchmark_tool_refuses_bad_input_with_one_line(planted, tmp_path, monkeypatch, capsys, args, msg):
    from tasks import benchmark

    monkeypatch.chdir(tmp_path)
    source = [] if "--model" in args else ["--checkpoint", str(planted[2])]
    assert benchmark.main([*source, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (MLflow may first say it created its store)
    assert msg in err[-1] and err[-1].startswith("error: benchmark:") and "Traceback" not in "\n".join(err), err


def test_benchmark_results_go_to_the_registered_version(planted, tmp_path, monkeypatch):
    import mlflow

    from tasks.lib import registry
    from tasks.lib.tracking import tracking_uri

    _, _, folder = planted
    monkeypatch.chdir(REPO)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("test-benchmark")
    name = f"bench-{uuid.uuid4().hex[:6]}"
    with mlflow.start_run() as run:
        version = registry.register_checkpoint(name, folder, {})
    from tasks import benchmark

    assert benchmark.main(["--model", f"models:/{name}/{version}", "--include", str(DATA), "--tasks", "tiny_mc"]) == 0
    client = mlflow.MlflowClient()
    acc = client.get_run(run.info.run_id).data.metrics["bench.tiny_mc.acc"]
    assert acc >= 5 / 6 and client.get_model_version(name, version).tags["bench.tiny_mc.acc"] == str(round(acc, 6))
