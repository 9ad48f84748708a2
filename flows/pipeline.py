"""The pipeline as a Prefect flow: one Prefect task per DVC stage, in dvc.yaml's order.

    python -m flows.pipeline                     # every stage (DVC skips what is up to date)
    python -m flows.pipeline --stages collect quality

Each task runs `dvc repro --single-item <stage>`, so caching and `dvc.lock` are exactly what
`dvc repro` gives (DVC owns caching; Prefect's task cache is off). The stage's output is
streamed to the Prefect log, failures are retried (`orchestration.retries` in params.yaml),
and each stage's metrics become a Prefect table artifact. An MLflow parent run spans the
flow; the stages' runs nest under it. With no `PREFECT_API_URL` set, Prefect runs on its
embedded ephemeral API; see flows/serve.py for a scheduled deployment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from tasks.config import load_params
from tasks.tracking import PARENT_ENV, flatten, git_commit, tracking_uri


def dvc_stages(project: Path) -> list[str]:
    """Stage names in dvc.yaml's order (written in dependency order)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    return list(spec["stages"])


@task(cache_policy=NONE)
def run_stage(stage: str, project: str, reports: str, parent_run_id: str | None) -> dict:
    """Run one DVC stage and publish its metrics; returns {'stage', 'ran', 'metrics'}."""
    logger = get_run_logger()
    env = dict(os.environ)
    # the stage commands say `python`: make it this interpreter (the project's venv)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # universal newlines: progress bars' \r updates arrive as lines
        if line.strip():
            lines.append(line.rstrip())
            logger.info(line.rstrip())
    if proc.wait() != 0:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"stage '{stage}' failed (dvc exit code {proc.returncode}):\n{tail}")
    ran = not any("didn't change, skipping" in ln for ln in lines)
    report = getattr(importlib.import_module(f"tasks.{stage}"), "REPORT", stage)  # evaluate writes reports/eval.*
    metrics_file = Path(project) / reports / f"{report}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    rows = [{"metric": k, "value": v} for k, v in flatten(metrics).items()]
    if rows:
        create_table_artifact(key=f"{stage}-metrics", table=rows, description=f"Metrics of stage '{stage}' ({'ran' if ran else 'up to date, skipped'})")
    md = metrics_file.with_suffix(".md")
    if md.is_file():
        create_markdown_artifact(key=f"{stage}-report", markdown=md.read_text(), description=f"Report of stage '{stage}'")
    return {"stage": stage, "ran": ran, "metrics": metrics}


@flow(name="gpt-pipeline", log_prints=True)
def pipeline(project: str = ".", params_file: str = "params.yaml", stages: list[str] | None = None) -> list[dict]:
    """Run the DVC stages in order through Prefect, under one MLflow parent run."""
    import mlflow

    root = Path(project).resolve()
    params = load_params(root / params_file)  # a bad params.yaml fails here, before any stage
    order = dvc_stages(root)
    unknown = [s for s in stages or [] if s not in order]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if stages is None or s in stages]
    orch = params.orchestration

    mlflow.set_tracking_uri(tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment(params.mlflow.experiment)
    cwd = Path.cwd()
    os.chdir(root)  # git commit of the project, not of wherever the flow was started
    try:
        tags = {"pipeline": "true", **git_commit()}
    finally:
        os.chdir(cwd)
    results = []
    with mlflow.start_run(run_name="pipeline", tags=tags) as parent:
        for stage in selected:
            runner = run_stage.with_options(name=stage, retries=orch.retries, retry_delay_seconds=orch.retry_delay_s)
            results.append(runner(stage, str(root), params.paths.reports, parent.info.run_id))
        mlflow.log_dict({r["stage"]: {"ran": r["ran"]} for r in results}, "stages.json")
        mlflow.log_metrics({"stages_run": sum(r["ran"] for r in results), "stages_skipped": sum(not r["ran"] for r in results)})
    create_table_artifact(
        key="pipeline-summary",
        table=[{"stage": r["stage"], "ran": r["ran"], "seconds": r["metrics"].get("seconds")} for r in results],
        description="Stages of this pipeline run (ran = executed, false = DVC found it up to date)",
    )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--project", default=".", help="project root (with dvc.yaml and params.yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", nargs="*", default=None, help="run only these stages (default: all)")
    args = ap.parse_args(argv)
    results = pipeline(project=args.project, params_file=args.params, stages=args.stages)
    for r in results:
        print(f"{r['stage']:>10}: {'ran' if r['ran'] else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
