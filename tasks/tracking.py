"""MLflow tracking shared by every stage: one nested run per stage execution.

With no `MLFLOW_TRACKING_URI` set, runs go to a local SQLite file (`mlflow.db`, artifacts in
`./mlruns`) so nothing needs a server; set the variable to use a tracking server. When the
Prefect flow runs the pipeline it opens a parent run and hands its id to the stages in
`GPT_PIPELINE_PARENT_RUN_ID`, so each stage's run nests under that pipeline execution.

Tags on every stage run: the git commit (and whether the tree was dirty), the DVC stage,
and the `dvc.lock` hash of each input path, so a run can be traced to the exact data.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

PARENT_ENV = "GPT_PIPELINE_PARENT_RUN_ID"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': [1, 2]}} -> {'a.b.0': 1, 'a.b.1': 2}"""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


_BAD_NAME = re.compile(r"[^\w\-. :/]")


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only, under names MLflow accepts (`cluster_sizes.>10` -> `cluster_sizes._10`)."""
    flat = flatten(metrics)
    return {
        _BAD_NAME.sub("_", k): float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def git_commit() -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
        return {"git.commit": sha, "git.dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown"}


def input_hashes(inputs: Mapping[str, Path], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """`dvc.lock` hashes of this stage's inputs, as recorded when their producer last ran."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    produced: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            produced[str(Path(out["path"]))] = out.get("md5") or out.get("hash") or ""
    return {f"input.{name}": produced[str(Path(p))] for name, p in inputs.items() if str(Path(p)) in produced}


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any], inputs: Mapping[str, Path]) -> Iterator[Any]:
    """Open the MLflow run of one stage (nested under the pipeline's run when there is one)."""
    import mlflow  # heavy (~3 s): imported on first use

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"stage": stage, **git_commit(), **input_hashes(inputs)}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as run:
        flat = {k: ("" if v is None else str(v)[:500]) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps one batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))
        yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(numeric_metrics(metrics), step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path)
    elif p.is_file():
        mlflow.log_artifact(str(p), artifact_path)
