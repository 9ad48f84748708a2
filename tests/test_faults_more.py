"""Faults and bad input, round two (issue 22): each case as the review wrote it, each once
silently wrong, a traceback or a leak, now a named error (exit 2, nothing written), handled,
or cleaned up."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tasks import collect, dedup, pretrain, sources, tokenize
from tests.conftest import REPO, make_project, tiny_raw_params
from tests.test_faults import edit_params, error_lines, prepared, run_main, tree, work  # noqa: F401 - fixtures


def expect_refused(module, capsys, named: str, untouched: list[str], work: Path) -> str:
    before = {o: tree(work / o) for o in untouched}
    code, err = run_main(module, capsys)
    assert code == 2, err[-2000:]
    assert error_lines(err) and named in err and "Traceback" not in err, err[-2000:]
    assert {o: tree(work / o) for o in untouched} == before, "nothing may be written"
    return err


# ------------------------------------------------------------------ silently wrong: paths
@pytest.mark.parametrize("key, value", [
    ("paths.sources", "mlflow.db"),            # overwrote the whole tracking store
    ("paths.sources", "params.yaml"), ("paths.reports", "dvc.yaml"), ("paths.sources", "dvc.lock"), ("paths.sources", "Makefile"),
    ("paths.raw", "docs"), ("paths.raw", "examples"),   # tracked folders replaced whole
])
def test_an_output_outside_the_output_folders_is_refused(key, value, work, capsys):
    (work / "params.yaml").write_bytes((work / "params.yaml").read_bytes())
    snapshot = {p: tree(work / p) for p in ("examples", "params.yaml")}
    edit_params(**{key: value})
    code, err = run_main(sources, capsys)
    assert code == 2 and f"{key} ({value}) is not inside an output folder" in err and "Traceback" not in err, err[-1500:]
    assert {p: tree(work / p) for p in snapshot} == {**snapshot, "params.yaml": tree(work / "params.yaml")}


def test_a_symlink_that_leads_out_of_the_output_folders_is_refused(work, capsys, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    shutil.rmtree(work / "data/raw")
    (work / "data/raw").symlink_to(outside)
    expect_refused(collect, capsys, "output 'raw' (data/raw) resolves to", [], work)
    assert (outside / "precious.txt").read_text() == "keep me"


def test_an_output_root_that_is_a_symlink_is_honoured(work, capsys, tmp_path):
    """data/ on a larger disk is a normal setup: the root folder itself may be a link."""
    big = tmp_path / "big-disk"
    shutil.move(str(work / "data"), big)
    (work / "data").symlink_to(big)
    code, err = run_main(sources, capsys)
    assert code == 0, err[-1500:]


def test_an_output_that_would_replace_a_tracked_file_is_refused(work, capsys):
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    (work / "data/keep.json").write_text("{}")
    subprocess.run(["git", "add", "data/keep.json"], cwd=work, check=True)
    edit_params(**{"paths.sources": "data/keep.json"})
    expect_refused(sources, capsys, "which git tracks", ["data/keep.json"], work)


def test_a_committed_metrics_file_is_rewritten(work, capsys):
    """A metrics file that git holds (a project that sets `cache: false` for its metrics): the stage rewrites it
    (a clone of a repository with committed figures must still run)."""
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    (work / "reports").mkdir(exist_ok=True)
    (work / "reports/sources.json").write_text("{}")
    subprocess.run(["git", "add", "-f", "reports/sources.json"], cwd=work, check=True)
    code, err = run_main(sources, capsys)
    assert code == 0, err[-1500:]
    assert json.loads((work / "reports/sources.json").read_text())  # the stage's figures, not the committed {}


# ------------------------------------------------------------------ silently wrong: registration
REGISTER = """
import contextlib, sys, time
sys.path.insert(0, sys.argv[1])
import mlflow
from pathlib import Path
from tasks.lib import registry
if sys.argv[4] == "nolock":  # as against a server: no machine-wide lock, only the check afterwards
    registry._registry_lock = contextlib.nullcontext
from tasks.lib.tracking import ensure_store
ensure_store(experiment="race")  # as a stage run does: the experiment made under the store's lock
mlflow.set_experiment("race")
while time.time() < float(sys.argv[3]):
    time.sleep(0.005)
with mlflow.start_run():
    print(registry.register_checkpoint("racer", Path(sys.argv[2]), {"who": sys.argv[5]}))
"""


@pytest.mark.parametrize("mode", ["lock", "nolock"])
def test_two_registrations_of_the_same_weights_at_once_give_one_version(mode, tmp_path):
    import mlflow
    import torch

    from tasks.lib.bpe import train_bpe
    from tasks.lib.model import GPT, ModelConfig, save_checkpoint

    tok = train_bpe(iter(["a b c d"] * 10), 300, 1)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", GPT(ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=32)),
                    tmp_path / "tok", {})
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # the store exists before the race
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(REPO), str(tmp_path / "ck"), start, mode, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
    versions = mlflow.MlflowClient(tracking_uri=uri).search_model_versions("name = 'racer'")
    assert len(versions) == 1 and {o.strip().splitlines()[-1] for o, _ in outs} == {str(versions[0].version)}
    assert versions[0].tags["checkpoint.sha256"]  # tagged in the same call that created it


# ------------------------------------------------------------------ silently wrong: internal files
def test_a_mix_index_that_leads_out_of_the_dedup_folder_is_refused(work, capsys):
    import pyarrow.parquet as pq

    from tasks.lib.mixture import INDEX_SCHEMA

    f = sorted((work / "data/mix").glob("*.parquet"))[0]
    t = pq.read_table(f, schema=INDEX_SCHEMA).to_pylist()
    raw_shard = sorted((work / "data/raw").rglob("part-*.parquet"))[0].relative_to(work / "data")
    t[0]["shard"] = f"../{raw_shard}"  # the raw, unfiltered crawl
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(t, schema=INDEX_SCHEMA), f)
    expect_refused(tokenize, capsys, "outside data/dedup", ["data/tokens"], work)


def test_an_index_row_past_the_shards_end_is_refused(work, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.lib.mixture import INDEX_SCHEMA

    f = sorted((work / "data/mix").glob("*.parquet"))[0]
    t = pq.read_table(f, schema=INDEX_SCHEMA).to_pylist()
    t[0]["row"] = 10_000_000
    pq.write_table(pa.Table.from_pylist(t, schema=INDEX_SCHEMA), f)
    expect_refused(tokenize, capsys, "row 10000000 of", ["data/tokens"], work)


def rewrite_shard(path: Path, change) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.lib.storage import DOC_SCHEMA

    rows = pq.read_table(path).to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=DOC_SCHEMA), path)


def test_two_documents_with_one_id_are_refused_by_dedup(work, capsys):
    shard = sorted((work / "data/filtered").rglob("part-*.parquet"))[0]
    rewrite_shard(shard, lambda rows: rows[1].update(id=rows[0]["id"]))
    err = expect_refused(dedup, capsys, "occur more than once", ["data/dedup"], work)
    assert "ids must be unique" in err


def test_a_document_without_text_is_refused(work, capsys):
    shard = sorted((work / "data/filtered").rglob("part-*.parquet"))[0]
    rewrite_shard(shard, lambda rows: rows[0].update(text=None))
    expect_refused(dedup, capsys, "document(s) without a text (null)", ["data/dedup"], work)


def test_token_ids_above_the_vocabulary_are_refused(work, capsys):
    import numpy as np

    meta = json.loads((work / "data/tokens/meta.json").read_text())
    arr = np.fromfile(work / "data/tokens/train.bin", dtype=meta["dtype"])
    arr[5] = meta["vocab_size"] + 3
    arr.tofile(work / "data/tokens/train.bin")
    expect_refused(pretrain, capsys, f"holds token id {meta['vocab_size'] + 3}", ["models/base"], work)


def test_a_kill_inside_a_checkpoint_replacement_keeps_the_resume(tmp_path):
    """The previous checkpoint was moved aside (`.name.old-PID`) and the new one never came:
    the next start puts it back before deciding whether to resume."""
    import torch

    from tasks.lib.model import GPT, ModelConfig
    from tasks.lib.train import load_state, make_optimizer, save_state
    from tests.conftest import train_cfg

    model = GPT(ModelConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    opt = make_optimizer(model, train_cfg(1), torch.device("cpu"))
    folder = tmp_path / "ck"
    save_state(folder, {"model": model}, {"model": opt}, {"step": 7, "fingerprint": "fp"})
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.replace(folder, tmp_path / f".ck.old-{dead.pid}")
    state = load_state(folder, {"model": model}, {"model": opt}, "fp")
    assert state is not None and state["step"] == 7 and folder.is_dir()


# ------------------------------------------------------------------ tracebacks become lines
def test_disk_full_during_an_output_write_and_a_checkpoint_is_one_line(work, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_model

    def full(model, filename, *a, **k):
        if "model.safetensors" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(model, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    edit_params(**{"pretrain.train.steps": 2, "pretrain.train.ckpt_every": 1})
    err = expect_refused(pretrain, capsys, "the disk is full", ["models/base"], work)
    assert "checkpoints/pretrain" in err  # the first write that failed: a checkpoint
    assert not list(work.rglob(".*.tmp-*")), "no temporary left behind"


def test_a_real_file_size_limit_is_one_line(work, tmp_path):
    """A write refused by the kernel (RLIMIT_FSIZE: EFBIG), not a simulated one: a model of
    7 MB under a limit of 2.5 MB (a fresh tracking store, about 1 MB, still fits)."""
    edit_params(**{"model.d_model": 256, "model.n_layer": 2, "pretrain.train.steps": 2})
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000)); sys.argv = ['x']; "
              "from tasks import pretrain; from tasks.stage import main; raise SystemExit(main(pretrain, []))")
    before = tree(work / "models/base")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "error: pretrain: cannot write" in res.stderr and "file-size limit" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert tree(work / "models/base") == before


def test_a_read_only_output_folder_is_one_line(work, capsys, monkeypatch):
    import tempfile

    real = tempfile.mkdtemp

    def denied(*a, **k):
        if str(k.get("dir", "")).endswith("data"):
            raise PermissionError(errno.EACCES, "Permission denied", k["dir"])
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    expect_refused(collect, capsys, "permission denied", ["data/raw"], work)


def test_a_locked_tracking_store_is_one_line(work, tmp_path):
    import sqlite3

    db = tmp_path / "locked.db"
    import mlflow

    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        res = subprocess.run([sys.executable, "-m", "tasks.sources"], cwd=work, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert res.returncode == 2 and f"the tracking store {db} is unusable" in res.stderr and "locked" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_a_corrupt_tracking_store_is_one_line(work, tmp_path):
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"this is not a database" * 100)
    res = subprocess.run([sys.executable, "-m", "tasks.sources"], cwd=work, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert res.returncode == 2 and "is not an MLflow store" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_a_tracking_server_that_dies_mid_stage_is_one_line(work, capsys, monkeypatch):
    import mlflow

    from tasks.lib import tracking

    def dead(*a, **k):
        raise mlflow.exceptions.MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
                                                "exception HTTPConnectionPool: Max retries exceeded (Connection refused)")

    monkeypatch.setattr(tracking, "log_metrics", dead)
    code, err = run_main(sources, capsys)
    assert code == 1 and "failed while recording this run" in err and "rerun it" in err and "Traceback" not in err, err[-2000:]
    assert len(error_lines(err)) == 1


@pytest.mark.parametrize("args, msg", [(["--stages", "nope"], "--stages: unknown stage(s) ['nope']"),
                                       (["--project", "/nonexistent"], "no dvc.yaml there"),
                                       (["--params", "missing.yaml"], "missing.yaml: no such file")])
def test_bad_arguments_of_the_flow_are_one_line(args, msg, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_deeply_nested_json_in_a_source_is_counted(work, capsys):
    Path("incoming").mkdir()
    Path("incoming/deep.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n" + json.dumps({"text": "A real document that is long enough."}) + "\n")
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["collect"]["sources"] = [{"name": "mine", "kind": "files", "role": "crawl", "globs": ["incoming/deep.jsonl"]}]
    raw["mix"]["weights"] = {"mine": 1.0}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    code, err = run_main(collect, capsys)
    assert code == 0, err[-2000:]
    m = json.loads(Path("reports/collect.json").read_text())
    assert m["docs"] == 1 and json.dumps(m).count("json_too_deep") == 1


def as_from_a_terminal() -> None:
    """In the child before exec: Ctrl-C's default action, as a shell in a terminal gives it. A
    test run in the background of a non-interactive shell inherits SIGINT ignored (POSIX), and
    Python keeps an inherited SIG_IGN: the Ctrl-C tests would then test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_pool_workers_start_prints_no_worker_traceback(work):
    from tests.test_faults import process_tree

    edit_params(**{"executor.workers": 2})
    for attempt in range(3):  # the stage may finish before two workers are seen: a race the test retries
        proc = subprocess.Popen([sys.executable, "-m", "tasks.quality"], cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=as_from_a_terminal)
        seen = False
        while proc.poll() is None:  # until the pool's workers exist (they are still importing)
            if len(process_tree(proc.pid) - {proc.pid}) >= 2:
                seen = True
                break
            time.sleep(0.01)
        if seen:
            break
        proc.communicate(timeout=120)
    assert seen, "two pool workers were never seen while the stage ran"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "error: quality: interrupted" in err, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


# ------------------------------------------------------------------ leaks and hangs
@pytest.mark.slow  # 20-30 s of Prefect/MLflow processes: with the end-to-end tests, not the fast suite
def test_ctrl_c_of_the_flow_stops_everything_in_seconds(tmp_path):
    proj = make_project(tmp_path / "proj")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(PYTHONPATH=str(proj), PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "sources", "collect", "quality"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_from_a_terminal)
    from tests.test_faults import descendants_alive, process_tree

    pids: set[int] = set()
    deadline = time.time() + 240
    while time.time() < deadline:  # until a stage runs under dvc
        if proc.poll() is not None:  # the flow ended before any stage ran: show why
            out, err = proc.communicate()
            pytest.fail(f"the flow exited ({proc.returncode}) before a stage started:\n{err[-3000:]}")
        pids |= process_tree(proc.pid)
        if any("tasks." in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in pids if Path(f"/proc/{p}/cmdline").exists()):
            break
        time.sleep(0.2)
    pids |= process_tree(proc.pid)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground group
    out, err = proc.communicate(timeout=120)
    took = time.time() - t0
    assert "error: pipeline: stopped" in err and took < 40, (took, err[-2000:])
    time.sleep(2)
    assert not descendants_alive(pids - {proc.pid}), "dvc, the stage and Prefect's server stop with it"


def test_what_a_killed_stage_left_is_cleaned_by_the_next_stage_that_starts(work, capsys):
    """DVC may restore a killed stage's outputs from its run cache without running it: the
    next stage of any kind removes the temporaries and puts back what was moved aside."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = work / f"data/.dedup.tmp-{dead.pid}-abc"
    tmp.mkdir(parents=True)
    (tmp / "half.parquet").write_bytes(b"torn")
    (work / f"reports/.quality.json.tmp-{dead.pid}-x").write_text("{")
    shutil.move(str(work / "data/mix"), work / f"data/.mix.old-{dead.pid}")
    mix_before = tree(work / f"data/.mix.old-{dead.pid}")
    code, err = run_main(sources, capsys)
    assert code == 0, err[-1500:]
    assert not tmp.exists() and not list((work / "reports").glob(".quality.json.tmp-*"))
    assert tree(work / "data/mix") == mix_before


def test_a_stage_started_after_a_killed_one_marks_its_run_killed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("gpt-pipeline")
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    run = client.create_run(exp, tags={"process.host": socket.gethostname(), "process.pid": str(dead.pid)})
    proj = make_project(tmp_path / "proj")
    res = subprocess.run([sys.executable, "-m", "tasks.sources"], cwd=proj, env={**os.environ, "PYTHONPATH": str(proj), "MLFLOW_TRACKING_URI": uri},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-1500:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


# ------------------------------------------------------------------ security
@pytest.mark.slow  # 20-30 s of Prefect/MLflow processes: with the end-to-end tests, not the fast suite
def test_a_password_in_the_tracking_uri_is_never_printed(work):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:s3cret-pw@127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "tasks.sources"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "s3cret-pw" not in res.stderr + res.stdout, res.stderr[-2000:]
    assert f"http://***@127.0.0.1:{port}" in res.stderr


def test_the_health_check_uses_the_credentials_of_the_uri():
    import base64
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tasks.lib.tracking import wait_healthy

    want = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.headers.get("Authorization") == want else 401)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        warnings: list[str] = []
        assert wait_healthy(f"http://alice:s3cret@127.0.0.1:{port}", 3, "MLflow", warnings.append) is None
        err = wait_healthy(f"http://alice:wrong@127.0.0.1:{port}", 1.5, "MLflow", warnings.append)
        assert err is not None and all("wrong" not in w and "s3cret" not in w for w in warnings)
    finally:
        server.shutdown()


# ------------------------------------------------------------------ operations
def test_the_readme_names_the_deployment_that_exists():
    import re

    from tasks.config import load_params

    name = load_params(str(REPO / "params.yaml")).orchestration.deployment_name
    runs = re.findall(r"prefect deployment run '([^']+)'", (REPO / "README.md").read_text() + "".join(
        p.read_text() for p in (REPO / "docs").glob("*.md")))
    assert runs and all(r == f"gpt-pipeline/{name}" for r in runs), runs


def test_saving_a_ranking_does_not_make_judge_labelled_preferences_stale(tmp_path):
    from tasks.sources import labels_fingerprint

    f = tmp_path / "rankings.jsonl"
    f.write_text("")
    gold = labels_fingerprint("gold", f)
    human = labels_fingerprint("file", f)
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert labels_fingerprint("gold", f) == gold and labels_fingerprint("file", f) != human
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["preferences"]
    assert "${paths.human_preferences}" not in spec["deps"] and "${paths.labels}" in spec["deps"]


def test_a_worker_whose_parent_died_while_it_started_exits(tmp_path):
    """PR_SET_PDEATHSIG set after the parent died never fires: the orphan check must end the worker."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, time\n"
        "def child():\n"
        "    time.sleep(1.0)  # still starting (importing) when the parent dies\n"
        "    from tasks.lib.executor import orphan_guard\n"
        "    orphan_guard()\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    p = multiprocessing.get_context('spawn').Process(target=child)\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    os._exit(0)  # the parent dies at once, as under SIGKILL\n")
    out = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    child = int(out.stdout.split()[0])
    from tests.test_faults import descendants_alive

    deadline = time.time() + 20
    while descendants_alive({child}) and time.time() < deadline:
        time.sleep(0.1)
    assert not descendants_alive({child}), "the orphaned worker is still running"
