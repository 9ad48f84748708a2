"""The pipeline against real servers, started by infra/run-local.sh (make services): PostgreSQL,
an S3 store (moto_server), the MLflow tracking server (Postgres backend, artifacts proxied to
S3), the Prefect server (Postgres) and the worker serving the deployment. Nothing is mocked.

    python -m pytest tests/test_services.py             # all (the end-to-end one is slow, ~6 min)
    python -m pytest tests/test_services.py -m "not slow"

The fast tests check the compose file against the script's services, a server that is down
(one line naming its URL, in seconds) and the script's refusals. The slow one runs a tiny
project through the served deployment with restarts of MLflow and Prefect in the middle,
checks runs, artifacts (in the S3 bucket), the registry and the databases, pushes to the DVC
remote on the S3 store, pulls into a fresh clone that then reruns nothing, and stops every
process it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, dvc, git, make_project

SCRIPT = REPO / "infra/run-local.sh"
COMPOSE = REPO / "infra/docker-compose.yml"
DATA_HALF = ["sources", "collect", "quality", "dedup", "mix", "tokenizer", "tokenize"]
TRAINING = ["pretrain", "sft", "preferences", "reward", "ppo", "group_rl", "dpo", "evaluate"]
STAGES = DATA_HALF + TRAINING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def local_services() -> dict[str, dict]:
    """`run-local.sh services`: per service its port variable, port, credentials, client settings."""
    out = script("services", env={k: v for k, v in os.environ.items() if not k.startswith("SERVICES_")}).stdout
    rows = [line.split("\t") for line in out.splitlines() if line and not line.startswith("#")]
    return {name: {"port_var": pv, "port": port, "credentials": set(cr.split(",")) - {"-"}, "settings": set(st.split(",")) - {"-"}}
            for name, pv, port, cr, st in rows}


# ----------------------------------------------------------------------------- the compose file
def referenced(node) -> set[str]:
    """The ${VAR} / $${VAR} names a compose service reads from the environment."""
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", json.dumps(node)))


def test_compose_file_has_the_local_scripts_services():
    spec = yaml.safe_load(COMPOSE.read_text())
    local = local_services()
    assert "name" not in spec, "Debian's docker-compose 1.29 rejects a top-level `name:`"
    services = spec["services"]
    assert set(services) - {"s3-buckets"} == set(local), "the compose file and run-local.sh start the same services"
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith((":latest", ":main")), f"{name}: image tag not pinned: {image}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond 127.0.0.1"
        for vol in svc.get("volumes", []):
            assert ".venv" not in vol, f"{name} mounts a host venv: {vol}"
        command = json.dumps(svc.get("command", "")) + json.dumps(svc.get("entrypoint", ""))
        assert not re.search(r"pip install|make setup|apt-get", command), f"{name} installs at every start: {command}"
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file, not taken from the environment"
    for name, want in local.items():
        svc = services[name]
        if want["port_var"] != "-":  # published on the script's port, from the same variable
            assert any(p.startswith(f"127.0.0.1:${{{want['port_var']}:-{want['port']}}}:") for p in svc["ports"]), (name, svc["ports"])
        creds = referenced(svc) - {v["port_var"] for v in local.values()}
        assert creds == want["credentials"], f"{name}: compose reads {sorted(creds)}, run-local.sh gives {sorted(want['credentials'])}"
        assert want["settings"] <= set(svc.get("environment") or {}), f"{name}: compose lacks {want['settings'] - set(svc['environment'])}"

    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert "--serve-artifacts" in cmd and "--artifacts-destination s3://mlflow" in cmd and "--backend-store-uri postgresql://" in cmd
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "python -m flows.serve" in services["worker"]["command"]
    # images built once, from Dockerfiles that install what the services need
    mlflow_df = (COMPOSE.parent / mlflow["build"]["dockerfile"]).read_text()
    assert "psycopg2-binary" in mlflow_df and "boto3" in mlflow_df
    worker_build = services["worker"]["build"]
    worker_df = (COMPOSE.parent / worker_build["context"] / worker_build["dockerfile"]).read_text()
    torch_pin = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert re.search(rf"pip install .*torch=={re.escape(torch_pin)} --index-url \$\{{TORCH_INDEX\}}", worker_df), \
        "the worker's torch must be the version the Makefile pins, from the TORCH_INDEX build argument"
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in worker_df, "the CPU build by default"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("dvc-s3") for d in deps) and any(d.startswith("psycopg2-binary") for d in deps)


def compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*cli, "version"], capture_output=True, timeout=30).returncode == 0:
                return cli
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def test_compose_file_passes_docker_compose_config():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here; test_compose_file_has_the_local_scripts_services checks the YAML")
    env = {**os.environ, "POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    res = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- servers that are down
@pytest.mark.slow  # 20-30 s of Prefect/MLflow processes: with the end-to-end tests, not the fast suite
def test_a_prefect_api_that_is_down_fails_fast_naming_it(tmp_path):
    port = free_port()  # nothing listens here once the socket is closed
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    procs = {mod: subprocess.Popen([sys.executable, "-m", mod, "--project", str(REPO), *extra], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mod, extra in (("flows.pipeline", ["--stages", "sources"]), ("flows.serve", ["--register-only"]))}
    for mod, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 2 and url in last and "does not answer" in last, f"{mod}: {err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
    assert time.time() - t0 < 60


def test_the_script_refuses_a_busy_port_and_reports_nothing_started(tmp_path):
    svc = tmp_path / "svc"
    env = {**os.environ, "SERVICES_DIR": str(svc), "PYTHON": sys.executable}
    res = script("status", env=env)
    assert res.returncode == 0 and all(f"{name}" in res.stdout for name in local_services()) and "running" not in res.stdout
    assert "nothing started" in script("down", env=env).stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = script("up", "s3", env={**env, "SERVICES_S3_PORT": str(port)}, timeout=120)
    assert res.returncode != 0 and f"port {port} for s3 is already in use" in res.stderr and "SERVICES_S3_PORT" in res.stderr
    assert not (svc / "s3.pid").exists()
    assert (svc / "env").stat().st_mode & 0o077 == 0, "the env file holds credentials: owner only"


# ----------------------------------------------------------------------------- end to end
def read_env(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", path.read_text(), re.M))


def pids_of(svc: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in svc.glob("*.pid")}


def processes_of(base: Path, pids: set[int]) -> list[str]:
    """Live processes we started: a recorded pid, its group or children, or anything whose
    command line or working directory is inside `base` (stages, dvc, flow runs)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        pid = int(d.name)
        if pid == os.getpid():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd") if os.access(d / "cwd", os.F_OK) else ""
        except (OSError, IndexError):
            continue
        state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
        if state != "Z" and (pid in pids or pgid in pids or ppid in pids or str(base) in cmd or cwd.startswith(str(base))):
            found.append(f"{pid} {cmd[:150]}")
    return found


TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters={"stages": json.loads(sys.argv[2])}, timeout=float(sys.argv[3]))
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message}))
"""


def run_through_deployment(name: str, stages: list[str], env: dict, timeout: float = 900) -> dict:
    """Trigger a run of the served deployment through the Prefect API; the worker executes it."""
    res = subprocess.run([sys.executable, "-c", TRIGGER, name, json.dumps(stages), str(timeout)], env=env,
                         capture_output=True, text=True, timeout=timeout + 60)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.mark.slow
def test_the_pipeline_on_real_servers_end_to_end():
    import boto3
    import mlflow
    import psycopg2

    timings: dict[str, float] = {}
    t_start = time.time()
    # PostgreSQL runs as the `postgres` OS user when we are root: its folders must be reachable
    base = Path(tempfile.mkdtemp(prefix="gpt-services-"))
    base.chmod(0o755)
    svc = base / "services"
    ports = {k: free_port() for k in ("PG", "S3", "MLFLOW", "PREFECT")}
    proj = make_project(base / "proj")
    dvc(proj, "remote", "add", "-d", "store", "s3://dvc")
    dvc(proj, "remote", "modify", "store", "endpointurl", f"http://127.0.0.1:{ports['S3']}")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "DVC remote on the S3 store (no credentials)")
    assert "secret" not in (proj / ".dvc/config").read_text().lower()

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "AWS_", "MLFLOW_", "PREFECT_API", "SERVICES_"))}
    up_env = {**clean, "SERVICES_DIR": str(svc), "SERVICES_PROJECT": str(proj), "PYTHON": sys.executable, "SERVICES_WAIT_S": "240",
              **{f"SERVICES_{k}_PORT": str(v) for k, v in ports.items()}}
    started: dict[str, int] = {}
    try:
        # ---- up: every service healthy, credentials generated and never printed
        t0 = time.time()
        up = script("up", env=up_env)
        timings["services up"] = time.time() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        settings = read_env(svc / "env")
        secrets = [settings["POSTGRES_PASSWORD"], settings["AWS_SECRET_ACCESS_KEY"]]
        assert all(s not in up.stdout + up.stderr for s in secrets), "a credential was printed"
        started = pids_of(svc)
        assert set(started) == {"postgres", "s3", "mlflow", "prefect", "worker"}
        status = script("status", env=up_env)
        assert status.returncode == 0 and status.stdout.count("healthy") == 4, status.stdout
        assert processes_of(base, set(started.values())), "the leftover check must see the running services"
        client_env = {**clean, **settings, "PYTHONPATH": str(proj), "PREFECT_HOME": str(base / "client-prefect")}
        mlflow_uri, prefect_api = settings["MLFLOW_TRACKING_URI"], settings["PREFECT_API_URL"]
        assert mlflow_uri == f"http://127.0.0.1:{ports['MLFLOW']}" and prefect_api == f"http://127.0.0.1:{ports['PREFECT']}/api"
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
        s3 = boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"], aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        pg = {"host": "127.0.0.1", "port": ports["PG"], "user": settings["POSTGRES_USER"], "password": settings["POSTGRES_PASSWORD"]}
        deployment = f"gpt-pipeline/{yaml.safe_load((proj / 'params.yaml').read_text())['orchestration']['deployment_name']}"

        # ---- the first part of the data half through the served deployment
        t0 = time.time()
        first = run_through_deployment(deployment, DATA_HALF[:5], client_env)
        timings["deployment run 1 (sources..mix)"] = time.time() - t0
        assert first["state"] == "COMPLETED", first

        def stage_runs() -> dict[str, list]:
            exp = client.get_experiment_by_name("gpt-pipeline")
            runs = client.search_runs([exp.experiment_id], max_results=1000)
            out: dict[str, list] = {}
            for r in runs:
                out.setdefault(r.data.tags.get("stage", "pipeline" if r.data.tags.get("pipeline") else "?"), []).append(r)
            return out

        before = stage_runs()
        assert set(before) == {"pipeline", *DATA_HALF[:5]} and all(len(v) == 1 for v in before.values()), {k: len(v) for k, v in before.items()}
        parent = before["pipeline"][0].info.run_id
        collect = before["collect"][0]
        assert collect.info.status == "FINISHED" and collect.data.tags["mlflow.parentRunId"] == parent
        assert collect.data.metrics["docs"] > 0
        assert {a.path for a in client.list_artifacts(collect.info.run_id, "reports")} >= {"reports/collect.json"}
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(collect.info.run_id in k and k.endswith("reports/collect.json") for k in keys), "artifacts are not in the S3 bucket"

        # ---- MLflow stopped: a stage fails fast naming the URI, writes nothing
        assert script("down", "mlflow", env=up_env).returncode == 0
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "tasks.tokenizer"], cwd=proj, env=client_env, capture_output=True, text=True, timeout=180)
        timings["stage against a stopped MLflow"] = time.time() - t0
        assert res.returncode == 2 and mlflow_uri in res.stderr and "does not answer" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and timings["stage against a stopped MLflow"] < 60
        assert not (proj / "models/tokenizer").exists()

        # ---- both servers restarted: nothing lost, the worker (never restarted) serves on
        assert script("down", "prefect", env=up_env).returncode == 0
        t0 = time.time()
        again = script("up", "mlflow", "prefect", env=up_env)
        timings["MLflow and Prefect restart"] = time.time() - t0
        assert again.returncode == 0, again.stdout + again.stderr
        assert pids_of(svc)["worker"] == started["worker"]
        started.update(pids_of(svc))
        after = stage_runs()
        assert {k: [r.info.run_id for r in v] for k, v in after.items()} == {k: [r.info.run_id for r in v] for k, v in before.items()}
        with urllib.request.urlopen(f"{prefect_api}/flow_runs/{first['id']}", timeout=10) as r:
            assert json.load(r)["state_type"] == "COMPLETED"

        # ---- the rest of the pipeline (tokenizer to evaluate) through the deployment
        t0 = time.time()
        second = run_through_deployment(deployment, DATA_HALF[5:] + TRAINING, client_env)
        timings["deployment run 2 (tokenizer..evaluate)"] = time.time() - t0
        assert second["state"] == "COMPLETED", second
        runs = stage_runs()
        assert set(runs) == {"pipeline", *STAGES} and len(runs["pipeline"]) == 2, {k: len(v) for k, v in runs.items()}
        assert all(r.info.status == "FINISHED" for v in runs.values() for r in v)
        # the registry on the server: one version per trained model, the champion by alias,
        # the weights in the S3 bucket
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in page.get("Contents", [])]
        for name, count in (("base", 1), ("sft", 1), ("reward", 1), ("rlhf", 3)):  # rlhf: ppo, group_rl, dpo
            versions = client.search_model_versions(f"name = '{name}'")
            assert len(versions) == count, (name, len(versions))
            for version in versions:
                model_id = version.source.removeprefix("models:/")  # the logged model: models:/m-<id>
                assert any(f"/models/{model_id}/" in k and k.endswith("model.safetensors") for k in keys), (name, version.source)
        # search results through the REST API carry no aliases: read each version
        aliases = {a for v in client.search_model_versions("name = 'rlhf'") for a in client.get_model_version("rlhf", v.version).aliases}
        assert aliases in ({"champion"}, {"challenger"}), aliases  # a verdict either way, recorded on the server
        # the records are in PostgreSQL
        with psycopg2.connect(dbname="mlflow", **pg) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from runs")
            assert cur.fetchone()[0] == sum(len(v) for v in runs.values())
        with psycopg2.connect(dbname="prefect", **pg) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from flow_run where id in (%s, %s) and state_type = 'COMPLETED'", (first["id"], second["id"]))
            assert cur.fetchone()[0] == 2

        # ---- dvc push to the S3 remote; a fresh clone pulls and has nothing to rerun
        t0 = time.time()
        dvc(proj, "push", env=client_env)
        git(proj, "add", "-A")
        git(proj, "commit", "-qm", "pipeline run")
        clone = base / "clone"
        subprocess.run(["git", "clone", "-q", str(proj), str(clone)], check=True)
        clone_env = {**client_env, "PYTHONPATH": str(clone)}
        dvc(clone, "pull", env=clone_env)
        assert (clone / "checkpoints/pretrain").is_dir() and (clone / "models/ppo/model.safetensors").is_file()
        status = dvc(clone, "status", "--json", env=clone_env)
        assert set(json.loads(status.stdout)) <= {"sources"}, status.stdout
        rerun = dvc(clone, "repro", env=clone_env)
        timings["push, clone, pull, repro"] = time.time() - t0
        assert ran(rerun.stdout) == ["sources"], rerun.stdout
        assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout == ""

        # ---- down: exactly what was started, and all of it
        t0 = time.time()
        down = script("down", env=up_env)
        timings["services down"] = time.time() - t0
        assert down.returncode == 0, down.stdout + down.stderr
        assert not list(svc.glob("*.pid"))
        left = processes_of(base, set(started.values()))
        assert not left, f"processes left running:\n" + "\n".join(left)
        for port in ports.values():
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
        logs = "".join(p.read_text(errors="replace") for p in (svc / "logs").glob("*.log"))
        assert all(s not in logs for s in secrets), "a credential reached a log"
    finally:  # whatever happened above: stop what was started, then say how long each part took
        script("down", env=up_env, timeout=300)
        timings["total"] = time.time() - t_start
        print("\n".join(f"  {k}: {v:.0f} s" for k, v in timings.items()))
        shutil.rmtree(base, ignore_errors=True)
