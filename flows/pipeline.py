"""The pipeline as a Prefect flow: one Prefect task per DVC stage, in dvc.yaml's order.

    python -m flows.pipeline                     # every stage (DVC skips what is up to date)
    python -m flows.pipeline --stages collect quality

Each task runs `dvc repro --single-item <stage>`, so caching and `dvc.lock` are exactly what
`dvc repro` gives (DVC owns caching; Prefect's task cache is off). The stage's output is
streamed to the Prefect log; a failure that can pass on a retry (I/O, a lost server) is
retried (`orchestration.retries`), one that cannot (bad params or input: the stage exits
with code 2) fails at once. Each stage's metrics become a Prefect table artifact and its
report a markdown artifact. An MLflow parent run spans the flow; the stages' runs nest
under it. With no `PREFECT_API_URL` set, Prefect runs on its embedded ephemeral API; see
flows/serve.py for a scheduled deployment. With `orchestration.gpu_work_pool` set, the stages
that have a `compute` block (pretrain ... evaluate) run as flow runs of the `gpt-stage`
deployment on that work pool (`stage_flow`: a worker on a GPU machine), the others in this
flow run; the pipeline waits for each in turn. When `PREFECT_API_URL` or an http
`MLFLOW_TRACKING_URI` is set, `main` first waits (bounded) for those servers and, if one
does not answer, stops with one line naming its URL (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact


def artifact_key(stage: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only (group_rl -> group-rl)."""
    return re.sub(r"[^a-z0-9-]", "-", stage.lower())

from prefect.cache_policies import NONE

from tasks.config import load_params
from tasks.lib.errors import StageError
from tasks.lib.process import die_with_parent
from tasks.lib.tracking import PARENT_ENV, ensure_store, flatten, git_commit, process_tags, reconcile_stale_runs, redact, tracking_uri, wait_healthy

SERVICE_WAIT_S = 20.0  # how long a server that is down is waited for before giving up


class ServiceUnavailable(RuntimeError):
    """A configured server (Prefect API, MLflow tracking) that does not answer."""


def ensure_prefect_api(wait_s: float = SERVICE_WAIT_S) -> str | None:
    """With a Prefect API configured (`PREFECT_API_URL`, or a profile), wait until its
    `/health` answers, retrying for up to `wait_s` seconds; raise ServiceUnavailable naming
    the URL if it never does. Returns the URL, or None for Prefect's ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    err = wait_healthy(url, wait_s, "Prefect API", lambda m: print(f"warning: {m}", file=sys.stderr))
    if err is not None:
        raise ServiceUnavailable(f"Prefect API {redact(url)} does not answer ({err}); start it (make services) or unset PREFECT_API_URL")
    return url


def ensure_services(wait_s: float = SERVICE_WAIT_S) -> None:
    """The servers this run is configured to use answer (see ensure_prefect_api and
    tasks.lib.tracking.ensure_store), or ServiceUnavailable names the one that does not."""
    ensure_prefect_api(wait_s)
    if tracking_uri().startswith(("http://", "https://")):
        try:
            ensure_store(tracking_uri(), wait_s=wait_s)
        except StageError as e:
            raise ServiceUnavailable(str(e)) from None


class StageFailed(RuntimeError):
    """A stage that failed; `retryable` is False when it exited with code 2 (bad params or input)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def dvc_stages(project: Path) -> list[str]:
    """Stage names in dvc.yaml's order (written in dependency order)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    return list(spec["stages"])


def retry_if_retryable(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - no result to inspect: retry as configured
            return True
    return not (isinstance(exc, StageFailed) and not exc.retryable)


def embed_images(markdown: str, folder: Path) -> str:
    """Relative PNG links become data URIs: a Prefect artifact has no folder to resolve them in."""
    def inline(m: re.Match) -> str:
        img = folder / m.group(2)
        if not img.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(img.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^):]+\.png)\)", inline, markdown)


def promotion_of(parent_run_id: str | None) -> dict | None:
    """The promotion decision the evaluate stage recorded in its MLflow run, if it ran."""
    if not parent_run_id:
        return None
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'evaluate'",
                              search_all_experiments=True, output_format="list")
    if not runs:
        return None
    tags = runs[0].data.tags
    return {"decision": tags.get("promotion.decision"), "reason": tags.get("promotion.reason")}


def run_dvc(stage: str, project: str, env: dict, logger) -> tuple[int, list[str]]:
    """`dvc repro --single-item <stage>` in its own process group, streamed to the log. If
    this process is stopped (Ctrl-C, SIGTERM), DVC and the stage are stopped with it."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=die_with_parent)  # SIGKILL of the flow: dvc and the stage stop too
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: progress bars' \r updates arrive as lines
            if line.strip():
                lines.append(line.rstrip())
                logger.info(line.rstrip())
        return proc.wait(), lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@task(cache_policy=NONE, retry_condition_fn=retry_if_retryable)
def run_stage(stage: str, project: str, reports: str, parent_run_id: str | None) -> dict:
    """Run one DVC stage and publish its metrics; returns {'stage', 'ran', 'metrics'}."""
    logger = get_run_logger()
    env = dict(os.environ)
    # the stage commands say `python`: make it this interpreter (the project's venv)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    code, lines = run_dvc(stage, project, env, logger)
    if code != 0:
        tail = "\n".join(lines[-15:])
        bad_input = any(re.search(r"exited with 2\b", ln) for ln in lines)
        raise StageFailed(f"stage '{stage}' failed (dvc exit code {code}"
                          f"{'; bad params or input, not retried' if bad_input else ''}):\n{tail}", retryable=not bad_input)
    ran = not any("didn't change, skipping" in ln for ln in lines)
    metrics_file = Path(project) / reports / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    rows = [{"metric": k, "value": v} for k, v in flatten(metrics).items()]
    if rows:
        create_table_artifact(key=f"{artifact_key(stage)}-metrics", table=rows, description=f"Metrics of stage '{stage}' ({'ran' if ran else 'up to date, skipped'})")
    md = Path(project) / reports / stage / "report.md"
    if md.is_file():
        text = embed_images(md.read_text(), md.parent)
        promotion = promotion_of(parent_run_id) if stage == "evaluate" and ran else None
        if promotion:
            text += f"\n**Promotion**: {promotion['decision']} ({promotion['reason']})\n"
        create_markdown_artifact(key=f"{artifact_key(stage)}-report", markdown=text, description=f"Report of stage '{stage}'")
    return {"stage": stage, "ran": ran, "metrics": metrics}


STAGE_FLOW = "gpt-stage"  # the flow (and deployment prefix) that runs one stage on a work pool


@flow(name=STAGE_FLOW, log_prints=True)
def stage_flow(stage: str, project: str, reports: str, parent_run_id: str | None = None, params_file: str = "params.yaml"):
    """One stage as a flow run of its own: what a worker of `orchestration.gpu_work_pool`
    runs for the pipeline. The project folder is the pipeline's (a path both machines see)."""
    from prefect.states import Completed

    params = load_params(str(Path(project) / params_file))
    runner = run_stage.with_options(name=stage, retries=params.orchestration.retries, retry_delay_seconds=params.orchestration.retry_delay_s)
    result = runner(stage, project, reports, parent_run_id)
    # the message is what the pipeline reads back through the API (a result would need storage both machines see)
    return Completed(message="ran" if result["ran"] else "up to date", data=result)


def gpu_stages(params) -> set[str]:
    """The stages whose params section has a `compute` block: the ones a GPU pool runs."""
    return {name for name in type(params).model_fields if getattr(getattr(params, name), "compute", None) is not None}


def run_on_pool(stage: str, pool: str, project: str, params_file: str, reports: str, parent_run_id: str | None) -> dict:
    """Run `stage` as a flow run of `gpt-stage/<pool>` (a worker of that pool executes it) and
    wait for it; its metrics are read from the project folder it wrote them to."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    name = f"{STAGE_FLOW}/{pool}"
    logger.info("stage '%s' goes to work pool '%s' (deployment %s)", stage, pool, name)
    try:
        run = run_deployment(name, parameters={"stage": stage, "project": project, "reports": reports, "parent_run_id": parent_run_id,
                                               "params_file": params_file}, timeout=None, flow_run_name=stage, tags=["gpt-pipeline", stage])
    except ObjectNotFound:
        raise StageFailed(f"stage '{stage}': no deployment {name} on the Prefect API: register it with "
                          "`python -m flows.serve --register-only` (orchestration.gpu_work_pool is set)", retryable=False) from None
    state = run.state
    if state is None or not state.is_completed():
        raise StageFailed(f"stage '{stage}' failed on work pool '{pool}' (flow run {run.name}, {run.id}): "
                          f"{state.type.value if state else 'no state'} {state.message if state else ''}", retryable=False)
    metrics_file = Path(project) / reports / f"{stage}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"stage": stage, "ran": state.message == "ran", "metrics": metrics, "work_pool": pool, "flow_run": str(run.id)}


@flow(name="gpt-pipeline", log_prints=True)
def pipeline(project: str = ".", params_file: str = "params.yaml", stages: list[str] | None = None) -> list[dict]:
    """Run the DVC stages in order through Prefect, under one MLflow parent run."""
    import mlflow

    root = Path(project).resolve()
    params = load_params(str(root / params_file))  # a bad params.yaml fails here, before any stage
    order = dvc_stages(root)
    unknown = [s for s in stages or [] if s not in order]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    orch = params.orchestration
    on_gpu_pool = gpu_stages(params) if orch.gpu_work_pool else set()

    uri = tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(ensure_store(uri, experiment=params.mlflow.experiment))
    mlflow.set_experiment(params.mlflow.experiment)
    reconcile_stale_runs(params.mlflow.experiment)
    cwd = Path.cwd()
    os.chdir(root)  # git commit of the project, not of wherever the flow was started
    try:
        from tasks.stage import clean_all_stale

        clean_all_stale(params)  # what killed writers left (DVC may restore their stages from its cache without running them)
        tags = {"pipeline": "true", **git_commit(), **process_tags()}
    finally:
        os.chdir(cwd)
    results = []
    with mlflow.start_run(run_name="pipeline", tags=tags) as parent:
        try:
            for stage in selected:
                if stage in on_gpu_pool:  # retried there, by the stage's own flow run
                    results.append(run_on_pool(stage, orch.gpu_work_pool, str(root), params_file, params.paths.reports, parent.info.run_id))
                    continue
                runner = run_stage.with_options(name=stage, retries=orch.retries, retry_delay_seconds=orch.retry_delay_s)
                results.append(runner(stage, str(root), params.paths.reports, parent.info.run_id))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): the stage was stopped with us
            mlflow.end_run("KILLED")
            raise
        mlflow.log_dict({r["stage"]: {"ran": r["ran"]} for r in results}, "stages.json")
        mlflow.log_metrics({"stages_run": sum(r["ran"] for r in results), "stages_skipped": sum(not r["ran"] for r in results)})
    create_table_artifact(
        key="pipeline-summary",
        table=[{"stage": r["stage"], "ran": r["ran"]} for r in results],
        description="Stages of this pipeline run (ran = executed, false = DVC found it up to date)",
    )
    return results


SUPERVISED = "GPT_PIPELINE_SUPERVISED"


def supervise(argv: list[str], grace_s: float = 30.0) -> int:
    """Run the flow in a child process that dies with this one (PR_SET_PDEATHSIG), in a session
    of its own: Ctrl-C in the terminal reaches only this process, which asks the child to stop
    (SIGTERM). Sent to the whole foreground group, the same SIGINT used to kill Prefect's
    temporary API server first, and the flow then waited minutes to report its end. The child
    stops dvc and the stage, records the runs as killed and exits; if it has not within
    `grace_s` seconds its whole group is killed. SIGKILL of this process stops the child too."""
    child = subprocess.Popen([sys.executable, "-m", "flows.pipeline", *argv], env={**os.environ, SUPERVISED: "1"},
                             preexec_fn=die_with_parent, start_new_session=True)
    stopping: list[float] = []

    def forward(signum, frame):  # noqa: ARG001
        if not stopping:
            stopping.append(time.time())
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stopping and time.time() - stopping[0] > grace_s:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                print("error: pipeline: stopped (killed after it did not stop within "
                      f"{grace_s:.0f} s)", file=sys.stderr)
                return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not os.environ.get(SUPERVISED):
        return supervise(argv)
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--project", default=".", help="project root (with dvc.yaml and params.yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", nargs="*", default=None, help="run only these stages (default: all)")
    args = ap.parse_args(argv)

    def on_sigterm(signum, frame):  # noqa: ARG001 - stop like Ctrl-C: Prefect and MLflow record it, dvc is stopped
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:  # bad arguments and params are one line each, before Prefect starts
        root = Path(args.project).resolve()
        if not (root / "dvc.yaml").is_file():
            raise ValueError(f"--project {args.project}: no dvc.yaml there (the project's root folder)")
        load_params(str(root / args.params))
        order = dvc_stages(root)
        unknown = [st for st in args.stages or [] if st not in order]
        if unknown:
            raise ValueError(f"--stages: unknown stage(s) {unknown}; dvc.yaml has {order}")
        ensure_services()
    except (ServiceUnavailable, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: pipeline: {e}", file=sys.stderr)
        return 2
    try:
        results = pipeline(project=args.project, params_file=args.params, stages=args.stages)
    except KeyboardInterrupt:
        print("error: pipeline: stopped", file=sys.stderr)
        return 130
    for r in results:
        print(f"{r['stage']:>12}: {'ran' if r['ran'] else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
