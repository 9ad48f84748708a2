"""Prefect work pools: settings that cannot work refused by name, and what the end-to-end test
(tests/test_pipeline.py, the pipeline's deployment on one pool and the stages with a compute
block on another, each run by its own real `prefect worker` against a real Prefect server) uses.

    pytest tests/test_work_pools.py
"""

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import tiny_raw_params

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # each in a session of its own: its group holds what it started
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters={"stages": json.loads(sys.argv[2])}, timeout=600)
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message, "pool": run.work_pool_name}))
"""

FLOW_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs()
    print(json.dumps([{"name": r.name, "pool": r.work_pool_name, "state": r.state.type.value, "message": r.state.message,
                       "parameters": r.parameters, "parent": str(r.parent_task_run_id) if r.parent_task_run_id else None,
                       "deployment": str(r.deployment_id)} for r in runs]))
"""


@pytest.mark.parametrize(("pools", "named"), [
    ({"work_pool": "gpu", "gpu_work_pool": "gpu"}, "gpu_work_pool = work_pool = 'gpu'"),
    ({"gpu_work_pool": "my pool"}, "orchestration.gpu_work_pool"),
])
def test_pool_settings_that_cannot_work_are_refused_by_name(pools, named):
    from tasks.config import ConfigError, parse_params

    raw = tiny_raw_params()
    raw["orchestration"].update(pools)
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert named in str(err.value)


def test_a_missing_stage_deployment_is_one_error_naming_how_to_register_it(tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import run_on_pool

    @flow
    def send() -> dict:
        return run_on_pool("pretrain", "gpu", str(tmp_path), "params.yaml", "reports", None)

    with prefect_test_harness():
        state = send(return_state=True)
    assert state.is_failed()
    assert "no deployment gpt-stage/gpu on the Prefect API: register it with `python -m flows.serve --register-only`" in state.message
