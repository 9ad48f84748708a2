"""Bad input and faults: every input file kind, broken, gives a one-line error that names
the file and exit code 2, with nothing written; stages killed at any point leave their
previous outputs (or none), no run RUNNING, no process and no temporary behind, and a rerun
reaches the same weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks import collect, evaluate, preferences, pretrain, quality, reward, sft, tokenize
from tasks.stage import main
from tests.conftest import REPO, dvc, make_project, run_stage, tiny_raw_params

STATE = "faults-state"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A work folder with every stage's inputs made small: the data half run for real, a
    tiny base/SFT checkpoint, preferences from the example rankings."""
    from tasks import dedup, mix, sources, tokenizer
    from tasks.config import parse_params
    from tasks.lib.bpe import load_tokenizer
    from tasks.lib.model import GPT, ModelConfig, save_checkpoint

    root = tmp_path_factory.mktemp("prepared")
    old = Path.cwd()
    os.chdir(root)
    try:
        raw = tiny_raw_params()
        raw["paths"]["human_preferences"] = "examples/preferences.jsonl"
        shutil.copytree(REPO / "examples", root / "examples")
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = parse_params(raw)
        for stage in (sources, collect, quality, dedup, mix, tokenizer, tokenize):
            run_stage(stage, params)
        vocab = load_tokenizer(root / "models/tokenizer").get_vocab_size()
        import torch

        torch.manual_seed(0)
        gpt = GPT(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=32, max_seq_len=192))
        save_checkpoint(root / "models/base", gpt, root / "models/tokenizer", {"chat": False})
        save_checkpoint(root / "models/sft", gpt, root / "models/tokenizer", {"chat": True})
        for aligned in ("ppo", "group_rl", "dpo"):  # what evaluate reads: stand-ins with the SFT weights
            save_checkpoint(root / f"models/{aligned}", gpt, root / "models/tokenizer", {"chat": True})
        from tasks.lib.model import ScalarModel

        scalar = ScalarModel(gpt.cfg)
        scalar.body.load_state_dict(gpt.state_dict())
        save_checkpoint(root / "models/reward", scalar, root / "models/tokenizer", {"labeler": "human"})
        raw2 = {**raw, "preferences": {**raw["preferences"], "labeler": "file"}}
        run_stage(preferences, parse_params(raw2))
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def work(prepared, tmp_path, monkeypatch):
    dest = tmp_path / "w"
    shutil.copytree(prepared, dest)
    monkeypatch.chdir(dest)
    return dest


def run_main(module, capsys) -> tuple[int, str]:
    code = main(module, ["--params", "params.yaml"])
    err = capsys.readouterr().err
    return code, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def edit_params(**changes):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *head, last = dotted.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    Path("params.yaml").write_text(yaml.safe_dump(raw))


def tree(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() else {"": path.read_bytes()}


# (module, how to break the input, what the message must name, outputs that must stay untouched)
def corrupt(path, data=b"\x00garbage\xff"):
    def f():
        Path(path).write_bytes(data)
    return f


def truncate(path, keep=0.5):
    def f():
        b = Path(path).read_bytes()
        Path(path).write_bytes(b[: int(len(b) * keep)])
    return f


def odd_length(path):
    def f():
        with open(path, "ab") as fh:
            fh.write(b"\x01")
    return f


def other_columns(path):
    def f():
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["a valid Parquet file"], "score": [1.0]}), path)
    return f


def set_param(**changes):
    return lambda: edit_params(**changes)


def files_source(name, content: bytes, **extra):
    def f():
        Path("incoming").mkdir(exist_ok=True)
        Path("incoming", name).write_bytes(content)
        raw = yaml.safe_load(Path("params.yaml").read_text())
        raw["collect"]["sources"] = [{"name": "mine", "kind": "files", "role": "crawl", "globs": [f"incoming/{name}"], **extra}]
        raw["mix"]["weights"] = {"mine": 1.0}
        Path("params.yaml").write_text(yaml.safe_dump(raw))
    return f


def instruction_file(content: bytes):
    def f():
        Path("incoming").mkdir(exist_ok=True)
        Path("incoming/inst.jsonl").write_bytes(content)
        edit_params(**{"instructions.sources": [{"name": "mine", "kind": "files", "globs": ["incoming/inst.jsonl"]}]})
    return f


CASES = {
    # params.yaml values
    "params: infinite learning rate": (sft, set_param(**{"sft.train.lr": float("inf")}), "sft.train.lr", ["models/sft"]),
    "params: NaN mix weight": (collect, set_param(**{"mix.weights.python_docs": float("nan")}), "mix.weights.python_docs", ["data/raw"]),
    "params: seed out of range": (collect, set_param(seed=-1), "seed", ["data/raw"]),
    "params: output is the data folder": (collect, set_param(**{"paths.dedup": "data"}), "paths.dedup", ["data/raw"]),
    "params: output is the project": (collect, set_param(**{"paths.raw": "."}), "paths.raw", ["data/raw"]),
    "params: output inside .git": (collect, set_param(**{"paths.raw": ".git/raw"}), "paths.raw", ["data/raw"]),
    "params: not YAML": (collect, corrupt("params.yaml", b"seed: [1, 2\n"), "params.yaml", ["data/raw"]),
    "params: not UTF-8": (collect, corrupt("params.yaml", b"seed: \xff\xfe\n"), "params.yaml", ["data/raw"]),
    # source files
    "source: corrupt Parquet": (collect, files_source("x.parquet", b"PAR1 not really"), "x.parquet", ["data/raw"]),
    "source: hf json that is not JSON": (collect, lambda: (files_source("x.json", b"{broken\n")(), edit_params(**{"collect.sources": [
        {"name": "mine", "kind": "hf", "role": "crawl", "path": "json", "data_files": "incoming/x.json"}]})), "mine", ["data/raw"]),
    "source: nothing usable": (collect, files_source("x.jsonl", b"\xff\xfe\n{\"text\": \"\"}\n"), "yielded no usable document", ["data/raw"]),
    "instructions: bad JSON line": (sft, instruction_file(b'{"prompt": "a", "response": "b"}\n{oops\n'), "inst.jsonl:2", ["models/sft"]),
    "instructions: not UTF-8": (sft, instruction_file(b'{"prompt": "\xff"}\n'), "inst.jsonl:1", ["models/sft"]),
    # stage outputs read by later stages
    "raw shard corrupt": (quality, corrupt("data/raw/python_docs/part-00000.parquet"), "part-00000.parquet", ["data/filtered", "models/quality"]),
    "raw shard with other columns": (quality, other_columns("data/raw/python_docs/part-00000.parquet"), "not a document shard (columns text: string, score: double;",
                                     ["data/filtered", "models/quality"]),
    "tokenizer.json corrupt": (tokenize, corrupt("models/tokenizer/tokenizer.json", b'{"version": 1'), "tokenizer.json", ["data/tokens"]),
    "meta.json corrupt": (pretrain, corrupt("data/tokens/meta.json", b"{"), "meta.json", ["models/base"]),
    "train.bin truncated": (pretrain, truncate("data/tokens/train.bin"), "train.bin", ["models/base"]),
    "train.bin odd length": (pretrain, odd_length("data/tokens/train.bin"), "train.bin", ["models/base"]),
    "val.bin missing": (pretrain, lambda: os.unlink("data/tokens/val.bin"), "val.bin", ["models/base"]),
    "model.safetensors corrupt": (sft, truncate("models/base/model.safetensors", 0.3), "model.safetensors", ["models/sft"]),
    "config.json corrupt": (sft, corrupt("models/base/config.json", b'{"kind": "lm"}'), "config.json", ["models/sft"]),
    "checkpoint missing": (sft, lambda: shutil.rmtree("models/base"), "models/base", ["models/sft"]),
    "rankings: not UTF-8": (preferences, corrupt("examples/preferences.jsonl", b'{"prompt": "\xff"}\n'), "preferences.jsonl:1", ["data/preferences"]),
    "rankings: not a permutation": (preferences, corrupt("examples/preferences.jsonl", json.dumps(
        {"prompt": "p", "completions": ["a", "b"], "ranking": [1, 1]}).encode() + b"\n"), "preferences.jsonl:1", ["data/preferences"]),
    "rankings: a list, not an object": (preferences, corrupt("examples/preferences.jsonl", b"[1, 2]\n"), "preferences.jsonl:1", ["data/preferences"]),
    "preference pairs corrupt": (reward, corrupt("data/preferences/train.jsonl", b'{"prompt": 1}\n'), "train.jsonl:1", ["models/reward"]),
    # the verdict's own settings (issue 17): too few prompts for the interval asked, a judge the reference loses under
    "evaluate: split too small for the interval": (evaluate, set_param(**{"evaluate.max_ci_half_width": 0.02}), "evaluate.max_ci_half_width",
                                                   ["reports/evaluate"]),
    "evaluate: judge under which the reference loses": (evaluate, lambda: (instruction_file("".join(
        json.dumps({"prompt": f"What does f{i} do?", "response": f"Return item {i}. Return item {i}. Return item {i}. Return item {i}."}) + "\n"
        for i in range(300)).encode())(), edit_params(**{"judge.repetition_penalty": 100.0})), "check the judge settings", ["reports/evaluate"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error_exit_2_and_writes_nothing(case, work, capsys):
    module, breakit, named, outputs = CASES[case]
    before = {o: tree(work / o) for o in outputs}
    breakit()
    code, err = run_main(module, capsys)
    assert code == 2, err[-2000:]
    lines = error_lines(err)
    assert lines and named in err, err[-2000:]
    assert "Traceback" not in err
    assert all(tree(work / o) == before[o] for o in outputs), "a failed stage must not touch its outputs"
    assert not list(work.rglob(".*.tmp-*")), "no temporary left behind"


def test_paths_never_let_a_stage_remove_the_project(work, capsys):
    """`paths.dedup: data` once deleted data/raw, data/filtered and data/mix."""
    from tasks import dedup

    before = {p: tree(work / p) for p in ("data/raw", "data/filtered", "data/mix")}
    edit_params(**{"paths.dedup": "data"})
    code, err = run_main(dedup, capsys)
    assert code == 2 and "lies inside paths.dedup (data)" in err
    assert {p: tree(work / p) for p in before} == before


def test_diverging_training_stops_with_nothing_registered(work, capsys):
    import mlflow

    versions = lambda: len(mlflow.MlflowClient().search_model_versions("name = 'base'"))  # noqa: E731
    before, base = versions(), tree(work / "models/base")
    edit_params(**{"pretrain.train.lr": 1e6, "pretrain.train.warmup_steps": 0, "pretrain.train.grad_clip": 1e9})
    code, err = run_main(pretrain, capsys)
    assert code == 2 and "diverged" in err, err[-2000:]
    assert tree(work / "models/base") == base and versions() == before, "nothing written, nothing registered"


def test_a_corrupt_resume_checkpoint_is_reported_and_training_starts_over(work, capsys, caplog):
    from tasks.lib.hashing import file_hash

    assert run_main(pretrain, capsys)[0] == 0
    straight = file_hash(work / "models/base/model.safetensors")
    state = json.loads((work / "checkpoints/pretrain/state.json").read_text())
    state["finished"] = False
    (work / "checkpoints/pretrain/state.json").write_text(json.dumps(state))
    (work / "checkpoints/pretrain/model.safetensors").write_bytes(b"torn")
    shutil.rmtree(work / "models/base")
    code, err = run_main(pretrain, capsys)
    assert code == 0, err[-2000:]
    assert "unreadable" in caplog.text and "starting from scratch" in caplog.text
    assert file_hash(work / "models/base/model.safetensors") == straight


@pytest.mark.slow  # 20-30 s of Prefect/MLflow processes: with the end-to-end tests, not the fast suite
def test_concurrent_first_use_of_a_fresh_tracking_store(tmp_path):
    """Twelve processes opening runs on one new mlflow.db at once: all succeed."""
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from tasks.lib import tracking\n"
              "with tracking.stage_run('probe', 'race', {'i': sys.argv[2]}, {}):\n"
              "    tracking.log_metrics({'x': 1.0})\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(REPO), str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(12)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [e[-800:] for c, e in results if c]
    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
        [mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("race").experiment_id])
    assert len(runs) == 12 and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow  # 20-30 s of Prefect/MLflow processes: with the end-to-end tests, not the fast suite
def test_a_tracking_server_that_is_down_fails_fast_naming_it(work):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "tasks.sources"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert time.time() - t0 < 60


# ----------------------------------------------------------------------------- kills
def descendants_alive(pids: set[int]) -> list[int]:
    from tasks.lib.process import alive

    return [p for p in pids if alive(p) and Path(f"/proc/{p}/stat").is_file() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]


def process_tree(root_pid: int) -> set[int]:
    """The pids of root_pid and everything it started (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    seen, todo = set(), [root_pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return seen


def running_runs(proj: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], "attributes.status = 'RUNNING'")]


def leftovers(proj: Path) -> list[str]:
    return [str(p.relative_to(proj)) for p in proj.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def local_env(proj, **extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(proj), **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project run to the end once: the reference weights of every stage."""
    proj = make_project(tmp_path_factory.mktemp("trained") / "proj")
    dvc(proj, "repro", env=local_env(proj))
    return proj


def outputs_of(proj: Path, paths: list[str]) -> dict[str, dict[str, bytes]]:
    return {p: tree(proj / p) for p in paths}


KILLS = [  # (stage, when: seconds after start or a fault point, outputs to compare, upstream to run first)
    ("quality", 3.0, ["data/filtered", "models/quality"]),
    ("dedup", 2.5, ["data/dedup"]),
    ("pretrain", "pretrain:2", ["models/base", "checkpoints/pretrain"]),  # during its second checkpoint write
    ("pretrain", 6.0, ["models/base"]),
    ("sft", 7.0, ["models/sft"]),
    ("ppo", "ppo:1", ["models/ppo"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, when, outs", KILLS, ids=[f"{s}-{w}" for s, w, _ in KILLS])
def test_a_killed_stage_leaves_nothing_torn_and_reruns_to_the_same_weights(stage, when, outs, trained, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(trained, proj, symlinks=True)
    reference = outputs_of(trained, outs)
    for o in outs:  # the stage starts from nothing: its upstream outputs are there, its own are not
        shutil.rmtree(proj / o, ignore_errors=True)
    env = local_env(proj, **({"GPT_PIPELINE_FAULT": when} if isinstance(when, str) else {}))
    proc = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}"], cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids: set[int] = set()
    if isinstance(when, float):
        deadline = time.time() + when
        while time.time() < deadline and proc.poll() is None:
            pids |= process_tree(proc.pid)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    # children told by PR_SET_PDEATHSIG stop at once; one killed while still starting stops
    # when its start-up reaches the orphan check (tasks/lib/executor.py): give it that long
    deadline = time.time() + 20
    while descendants_alive(pids - {proc.pid}) and time.time() < deadline:
        time.sleep(0.1)
    assert not descendants_alive(pids - {proc.pid}), "a killed stage must not leave its workers running"
    for o in outs:  # previous (none here) or complete, never torn
        got = tree(proj / o)
        assert got in ({}, reference[o]) or o.startswith("checkpoints"), o
    res = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=proj, env=local_env(proj), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for o in outs:
        if not o.startswith("checkpoints"):
            assert tree(proj / o) == reference[o], f"{o}: the rerun must reach the same bytes"
    assert not running_runs(proj), "no MLflow run may stay RUNNING"
    assert not leftovers(proj), leftovers(proj)


@pytest.mark.slow
def test_a_killed_prefect_flow_stops_everything_it_started(trained, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(trained, proj, symlinks=True)
    shutil.rmtree(proj / "models/sft")
    env = local_env(proj, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "sft"], cwd=proj, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: set[int] = set()
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the stage itself runs, then kill the command the user started
        pids |= process_tree(proc.pid)
        if any("tasks.sft" in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in pids if Path(f"/proc/{p}/cmdline").exists()):
            break
        time.sleep(0.2)
    time.sleep(3)
    pids |= process_tree(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = time.time() + 60
    while descendants_alive(pids - {proc.pid}) and time.time() < gone:
        time.sleep(0.5)
    assert not descendants_alive(pids - {proc.pid}), "the flow, dvc, the stage and Prefect's server must stop with it"
    assert not running_runs(proj) or all(r.data.tags.get("process.pid") for r in running_runs(proj))
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stages", "sft"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not running_runs(proj), "runs of the killed flow are marked KILLED at the next start"
    assert tree(proj / "models/sft") == tree(trained / "models/sft")
    assert not leftovers(proj), leftovers(proj)


@pytest.mark.slow
def test_sft_reward_and_dpo_on_two_processes_train_the_weights_of_one(trained, tmp_path):
    """(Here for the trained project this module builds once; tests/test_distributed.py has
    pretrain's.) Each stage after pretrain, relaunched on 2 gloo processes, splits its
    grad_accum of 2 over them and trains the weights the one-process run trained, and tracks
    one run (rank 0's)."""
    import mlflow
    from safetensors.torch import load_file

    def runs(proj: Path) -> int:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
        return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())

    stages = ("sft", "reward", "dpo")
    proj = tmp_path / "proj"
    shutil.copytree(trained, proj, symlinks=True)
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    for stage in stages:
        assert raw[stage]["train"]["grad_accum"] == 2
        raw[stage]["compute"]["nproc_per_node"] = 2
        shutil.rmtree(proj / "checkpoints" / stage)  # else the finished one-process run is reused
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    before = runs(proj)
    written = {s: (proj / "models" / s / "model.safetensors").stat().st_mtime_ns for s in stages}
    for stage in stages:
        res = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=proj, env=local_env(proj, OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "2 processes (2 per node x 1 node(s)) under torchrun" in res.stderr
    assert runs(proj) - before == 3
    assert all((proj / "models" / s / "model.safetensors").stat().st_mtime_ns != written[s] for s in stages), "rewritten"
    for out in ("models/sft", "models/reward", "models/dpo"):
        a, b = (load_file(str(p / out / "model.safetensors")) for p in (trained, proj))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, out


@pytest.mark.slow
def test_ppo_and_group_rl_on_two_processes_sample_half_each_and_write_once(trained, tmp_path):
    """The RL stages relaunched on 2 gloo processes (each samples half of an iteration's prompts:
    tests/test_alignment.py) run to the end; the first process alone writes, tracks and registers."""
    import mlflow

    proj = tmp_path / "proj"
    shutil.copytree(trained, proj, symlinks=True)
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    for stage in ("ppo", "group_rl"):
        raw[stage]["compute"]["nproc_per_node"] = 2
        shutil.rmtree(proj / "checkpoints" / stage)  # else the finished one-process run is reused
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    versions = len(client.search_model_versions("name='rlhf'"))
    for stage in ("ppo", "group_rl"):
        res = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=proj, env=local_env(proj, OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "2 processes (2 per node x 1 node(s)) under torchrun" in res.stderr
        rows = json.loads((proj / "reports" / stage / "iterations.json").read_text())
        assert len(rows) == raw[stage]["steps"] + raw[stage].get("value_warmup", 0)
        assert all(r["gold_score"] == r["gold_score"] for r in rows), "the gold score of every process's responses"
        report = json.loads((proj / "reports" / f"{stage}.json").read_text())
        assert report["method"] == raw[stage].get("algorithm", "ppo")
    assert len(client.search_model_versions("name='rlhf'")) - versions == 2, "one registration per stage (rank 0's)"
