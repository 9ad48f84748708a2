"""End to end on throwaway projects, through DVC and Prefect: a fresh clone ends with every
model registered once and a champion, in a clean tree; reruns redo nothing; new data, changed
code and changed params rerun exactly what depends on them; Prefect gives DVC's outputs."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import dvc, git, make_project, tiny_raw_params

pytestmark = pytest.mark.slow
STAGES = ["sources", "collect", "quality", "dedup", "mix", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo",
          "group_rl", "dpo", "evaluate"]
ONE_EACH = {"base": ["1"], "sft": ["1"], "reward": ["1"], "rlhf": ["1", "2", "3"]}  # rlhf: ppo, group_rl and dpo
VOLATILE = ("seconds", "tokens_per_s", "registered_version", "resumed_from", "mfu")


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def lock_outs(proj) -> dict[str, str]:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def local_env(proj) -> dict:
    """The environment of a new user: no tracking URI set, so the clone's own mlflow.db is used."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(proj)}


def client_for(proj):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")


def registry_state(proj) -> dict[str, list[str]]:
    client = client_for(proj)
    return {name: sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) for name in ("base", "sft", "reward", "rlhf")}


@pytest.fixture(scope="module")
def ran_project(tmp_path_factory):
    """A project whose pipeline ran once; outputs and dvc.lock committed as a team would."""
    proj = make_project(tmp_path_factory.mktemp("ran") / "proj")
    first = dvc(proj, "repro", env=local_env(proj))
    assert ran(first.stdout) == STAGES
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "pipeline run")
    git(proj, "tag", "first-run")
    return proj


def test_fresh_clone_ends_with_a_champion_in_a_clean_tree(ran_project, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ran_project), str(clone)], check=True)
    env = local_env(clone)
    first = dvc(clone, "repro", env=env)
    assert ran(first.stdout) == STAGES  # outputs are not in git: everything is made here
    assert registry_state(clone) == ONE_EACH
    client = client_for(clone)
    methods = {client.get_model_version("rlhf", v).tags["method"] for v in ("1", "2", "3")}
    assert methods == {"ppo", "rloo", "dpo"}
    # the verdict: a champion only when earned, else the best candidate is the challenger
    verdict = {a for a in ("champion", "challenger") for v in ("1", "2", "3") if a in client.get_model_version("rlhf", v).aliases}
    assert len(verdict) == 1, verdict
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"the pipeline must leave the clone clean:\n{status}"
    assert lock_outs(clone) == lock_outs(ran_project)  # same params, same seed: the same bytes
    # lineage tags are true: a clean tree, parents found in this registry
    for name, parent in (("sft", "base"), ("reward", "sft"), ("rlhf", "sft")):
        v = client.get_model_version(name, "1")
        assert v.tags["git.dirty"] == "false" and v.tags["parent_model"] == f"{parent}/1", (name, v.tags)
        assert v.description and "made by the" in v.description  # the model card
    assert client.get_model_version("reward", "1").tags["labeler"] == "human"  # the tiny project ranks from a file
    for name in ("base", "sft", "reward"):  # every registered version has its card
        assert client.get_model_version(name, "1").description
    # every stage's run lists what it read as MLflow datasets (the UI's Dataset column), with DVC's hashes
    import yaml as _yaml

    spec = _yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    runs = {}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], max_results=1000):
            runs.setdefault(r.data.tags.get("stage"), r)
    for stage in STAGES[1:]:  # sources reads only params.yaml
        run = runs[stage]
        names = {d.dataset.name.split(":", 1)[0] for d in run.inputs.dataset_inputs}
        assert names and len(names) == len(run.inputs.dataset_inputs), (stage, names)
        assert all(d.dataset.digest for d in run.inputs.dataset_inputs), stage  # the dvc.lock hash of what it read
        assert len(spec[stage]["deps"]) > len(names)  # its code is a dependency too, its inputs are datasets
    for stage in STAGES:  # DVC metrics hold no figure that changes from run to run
        metrics = json.loads((clone / f"reports/{stage}.json").read_text())
        assert not [k for k in metrics if k in VOLATILE], stage
    # chat by alias works
    res = subprocess.run([sys.executable, "-m", "tasks.chat", "--model", "models:/rlhf@champion", "--prompt", "What does `len` do?",
                          "--max-new-tokens", "4"], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

    again = dvc(clone, "repro", env=env)
    assert ran(again.stdout) == ["sources"]  # the cheap source fingerprint only
    assert registry_state(clone) == ONE_EACH

    # forced reruns reuse the finished training runs as a whole: valid reports, no new version
    forced = dvc(clone, "repro", "-f", "-s", "pretrain", "sft", "reward", "ppo", "group_rl", "dpo", env=env)
    assert "reusing it" in forced.stdout + forced.stderr
    for stage in ("pretrain", "sft", "reward", "ppo", "group_rl", "dpo"):
        json.loads((clone / f"reports/{stage}.json").read_text())  # strict JSON: no NaN
        assert json.loads((clone / f"reports/{stage}.json").read_text()) == json.loads((ran_project / f"reports/{stage}.json").read_text())
    assert registry_state(clone) == ONE_EACH
    assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout == ""


def test_changed_code_and_params_rerun_what_depends_on_them(ran_project):
    env = local_env(ran_project)
    ppo = ran_project / "tasks/ppo.py"
    source = ppo.read_text()
    assert "seed=params.seed," in source
    ppo.write_text(source.replace("seed=params.seed,", "seed=params.seed + 1,"))  # a real change: other samples, other weights
    try:
        res = dvc(ran_project, "repro", env=env)
        assert ran(res.stdout) == ["sources", "ppo", "evaluate"], res.stdout
    finally:
        ppo.write_text(source)
    back = dvc(ran_project, "repro", env=env)
    assert ran(back.stdout) == ["sources", "ppo", "evaluate"]
    # the old code gives the old outputs again, byte for byte: dvc.lock is as committed
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ran_project, capture_output=True, text=True).stdout == ""
    exp = dvc(ran_project, "exp", "run", "-S", "ppo.kl.beta=0.2", env=env)
    assert ran(exp.stdout) == ["sources", "ppo", "evaluate"], exp.stdout
    diff = dvc(ran_project, "metrics", "diff", "--json", env=env)
    assert "reports/ppo.json" in json.loads(diff.stdout)


def test_a_new_document_in_a_files_source_reruns_collect(tmp_path):
    raw = tiny_raw_params()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.jsonl").write_text(json.dumps({"text": "The first document of the crawl."}) + "\n")
    raw["collect"]["sources"] = [{"name": "crawl", "kind": "files", "role": "crawl", "globs": [str(incoming / "*.jsonl")]}]
    raw["mix"]["weights"] = {"crawl": 1.0}
    proj = make_project(tmp_path / "proj", raw)
    env = local_env(proj)
    assert ran(dvc(proj, "repro", "collect", env=env).stdout) == ["sources", "collect"]
    assert ran(dvc(proj, "repro", "collect", env=env).stdout) == ["sources"]
    (incoming / "b.jsonl").write_text(json.dumps({"text": "A document that arrived overnight."}) + "\n")
    assert ran(dvc(proj, "repro", "collect", env=env).stdout) == ["sources", "collect"]
    assert json.loads((proj / "reports/collect.json").read_text())["docs"] == 2


def test_bad_params_fail_dvc_with_a_clear_message(project):
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["collect"]["max_chars"] = "lots"
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    res = dvc(project, "repro", "collect", check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "collect.max_chars = 'lots'" in out and "Traceback" not in out


def test_prefect_flow_matches_dvc_and_nests_mlflow_runs(ran_project, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    twin = tmp_path / "twin"
    subprocess.run(["git", "clone", "-q", str(ran_project), str(twin)], check=True)
    git(twin, "checkout", "-q", "first-run")  # the first run's dvc.lock (before the exp test)
    expected = lock_outs(twin)
    with prefect_test_harness():
        from flows.pipeline import pipeline

        results = pipeline(project=str(twin))
        assert [r["stage"] for r in results] == STAGES and all(r["ran"] for r in results)
        by_stage = {r["stage"]: r for r in results}
        assert by_stage["tokenize"]["metrics"]["train_tokens"] > 0
        again = pipeline(project=str(twin))
        assert [r["stage"] for r in again if r["ran"]] == ["sources"]  # DVC's skipping, seen through Prefect
    assert lock_outs(twin) == expected  # same outputs, byte for byte

    import mlflow

    parents = mlflow.search_runs(experiment_names=["gpt-pipeline"], filter_string="tags.pipeline = 'true'", output_format="list")
    first_parent = parents[-1]
    children = mlflow.search_runs(experiment_names=["gpt-pipeline"], filter_string=f"tags.mlflow.parentRunId = '{first_parent.info.run_id}'", output_format="list")
    assert sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
    assert first_parent.data.metrics["stages_run"] == len(STAGES)


@pytest.mark.slow
def test_training_stages_go_to_the_gpu_pool_and_data_stages_stay(ran_project, tmp_path):
    """Two work pools, two real workers, a real Prefect server: the pipeline's deployment runs
    on `cpu`, and pretrain (a stage with a compute block) as a subflow run on `gpu`."""
    import shutil

    from tests.test_work_pools import BIN, FLOW_RUNS, TRIGGER, free_port, healthy, start, stop

    proj = tmp_path / "proj"
    shutil.copytree(ran_project, proj, symlinks=True)  # outputs included: the data half is up to date
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["orchestration"].update(work_pool="cpu", gpu_work_pool="gpu", retries=0)
    raw["pretrain"]["train"]["steps"] += 1  # pretrain has something to do
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PYTHONPATH=str(proj), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "cpu", "gpu")}
    try:
        procs.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, env, logs["server"]))
        deadline = time.time() + 120
        while not healthy(api):
            assert time.time() < deadline and procs[0].poll() is None, logs["server"].read_text()[-3000:]
            time.sleep(1)
        # both deployments registered and both pools created; the pipeline is not served here
        reg = subprocess.run([sys.executable, "-m", "flows.serve", "--project", str(proj)], cwd=proj, env=env,
                             capture_output=True, text=True, timeout=180)
        assert reg.returncode == 0, reg.stderr[-3000:]
        name = raw["orchestration"]["deployment_name"]
        assert f"deployment gpt-pipeline/{name} on work pool 'cpu'" in reg.stdout
        assert "deployment gpt-stage/gpu on work pool 'gpu'" in reg.stdout
        assert "prefect worker start --pool cpu; prefect worker start --pool gpu" in reg.stdout
        for pool in ("cpu", "gpu"):
            procs.append(start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{pool}-worker"], proj, env, logs[pool]))

        res = subprocess.run([sys.executable, "-c", TRIGGER, f"gpt-pipeline/{name}", json.dumps(["tokenize", "pretrain"])],
                             cwd=proj, env=env, capture_output=True, text=True, timeout=700)
        assert res.returncode == 0, res.stderr[-3000:]
        top = json.loads(res.stdout.strip().splitlines()[-1])
        worker_logs = {p: logs[p].read_text() for p in ("cpu", "gpu")}
        assert top["state"] == "COMPLETED", (top, worker_logs)
        assert top["pool"] == "cpu"

        listing = subprocess.run([sys.executable, "-c", FLOW_RUNS], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stderr[-3000:]
        runs = json.loads(listing.stdout.strip().splitlines()[-1])
        stage_runs = [r for r in runs if r["pool"] == "gpu"]
        assert [r["parameters"]["stage"] for r in stage_runs] == ["pretrain"], runs  # tokenize stayed in the pipeline's run
        assert stage_runs[0]["state"] == "COMPLETED" and stage_runs[0]["message"] == "ran"
        assert stage_runs[0]["parent"], "the stage's run is a subflow of the pipeline's"
        assert (proj / "models/base/model.safetensors").is_file()
        assert "Running stage 'pretrain'" not in worker_logs["cpu"]
    finally:
        stop(procs[::-1])

    # MLflow: pretrain's new run nests under the new pipeline parent run, as without pools
    client = client_for(proj)
    exp = client.get_experiment_by_name(raw["mlflow"]["experiment"])
    newest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50)
    parent = next(r for r in newest if r.data.tags.get("pipeline") == "true")
    pre = next(r for r in newest if r.data.tags.get("stage") == "pretrain")
    assert pre.data.tags.get("mlflow.parentRunId") == parent.info.run_id and pre.info.start_time > parent.info.start_time
    assert yaml.safe_load((proj / "dvc.lock").read_text())["stages"]["pretrain"]["outs"]


def test_a_stage_with_bad_input_is_not_retried(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    raw = tiny_raw_params()
    raw["collect"]["sources"] = [{"name": "crawl", "kind": "files", "role": "crawl", "globs": [str(tmp_path / "nothing/*.jsonl")]}]
    raw["mix"]["weights"] = {"crawl": 1.0}
    raw["orchestration"].update(retries=2, retry_delay_s=0)
    proj = make_project(tmp_path / "proj", raw)
    with prefect_test_harness():
        from flows.pipeline import pipeline

        state = pipeline(project=str(proj), stages=["sources"], return_state=True)
        assert state.is_failed()
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:  # this flow run's task runs (the harness's database is shared)
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        (task_run,) = [r for r in runs if r.name.startswith("sources")]
        assert task_run.run_count == 1, "exit code 2 (bad input) must not be retried"
        assert "no file matches" in str(state.message) + str(task_run.state.message)


def test_deployment_registers_with_cron_and_timezone(project):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        from prefect.client.orchestration import get_client

        from flows.serve import build_deployment
        from tasks.config import load_params

        params = load_params(str(project / "params.yaml"))
        build_deployment(params, str(project)).apply()
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"gpt-pipeline/{params.orchestration.deployment_name}")
        assert dep.schedules and dep.schedules[0].schedule.cron == params.orchestration.cron
        assert dep.schedules[0].schedule.timezone == params.orchestration.timezone
        assert dep.parameters["project"] == str(project.resolve())
        assert "data stages" not in dep.description and params.orchestration.timezone in dep.description
