"""MLflow tracking shared by every stage: one nested run per stage execution.

With no `MLFLOW_TRACKING_URI` set, runs go to a local SQLite file (`mlflow.db`, artifacts in
`./mlruns`) so nothing needs a server; set the variable to use a tracking server. When the
Prefect flow runs the pipeline it opens a parent run and hands its id to the stages in
`GPT_PIPELINE_PARENT_RUN_ID`, so each stage's run nests under that pipeline execution.

Tags on every stage run: the git commit (and whether tracked files other than `dvc.lock`
differ from it), the DVC stage, and the `dvc.lock` hash of each input path, so a run can be
traced to the exact data. Before the first run, `ensure_store` creates (migrates) a local
SQLite store (and the stage's experiment) under a file lock, so stages started together on
a fresh clone don't race,
and checks that a tracking server answers, failing fast with its URI when it does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.lib.errors import StageError

PARENT_ENV = "GPT_PIPELINE_PARENT_RUN_ID"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
log = logging.getLogger("tracking")

# MLflow's own log formatting (colour codes) and download bars would land in every stage's log.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # a server that is down fails in seconds, not minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`http://user:secret@host/...` -> `http://***@host/...` anywhere in a message: a URI's
    credentials are never printed or logged."""
    return _CREDENTIALS.sub("***@", str(text))


class RedactFilter(logging.Filter):
    """Takes credentials out of every log record (ours, MLflow's, urllib3's warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "@" in msg:
            record.msg, record.args = redact(msg), None
        return True


def _request(url: str):
    """A urllib request for `url` with its user:password moved into a Basic auth header (urllib
    cannot open a URL that holds them)."""
    import base64
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    req = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)))
    token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    return req


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
    """The commit, and whether tracked files differ from it. `dvc.lock` is left out: DVC
    rewrites it during every `dvc repro`, which says nothing about the code."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"git.commit": sha, "git.dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown"}


def input_hashes(inputs: Mapping[str, Path], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """`dvc.lock` hashes of this stage's inputs, as recorded when their producer last ran."""
    lock_path = Path(lock_path)
    if not lock_path.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    produced: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            produced[str(Path(out["path"]))] = out.get("md5") or out.get("hash") or ""
    return {f"input.{name}": produced[str(Path(p))] for name, p in inputs.items() if str(Path(p)) in produced}


def wait_healthy(url: str, wait_s: float, what: str, warn) -> Exception | None:
    """Poll `url/health` until it answers 200, backing off from 1 s to 5 s for up to `wait_s`
    seconds (`warn(message)` at each retry). None when it answered, else the last error."""
    import urllib.error
    import urllib.request

    deadline, delay, err = time.time() + wait_s, 1.0, None
    while True:
        try:
            with urllib.request.urlopen(_request(f"{url.rstrip('/')}/health"), timeout=5) as r:
                if r.status == 200:
                    return None
                err = RuntimeError(f"HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            err = RuntimeError(redact(str(e)))
        if time.time() + delay > deadline:
            return err
        warn(f"{what} {redact(url)} not answering ({err}); retrying in {delay:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def ensure_store(uri: str | None = None, wait_s: float = 20.0, experiment: str | None = None) -> str:
    """Make the tracking store usable before a run starts (see the module docstring); with
    `experiment`, a local store also gets that experiment under the same lock (two processes
    creating one experiment at the same moment on SQLite can leave one of them with an id
    that does not exist: seen when two registrations started together)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process creates/migrates; the others wait, then find it ready
            import mlflow

            try:
                client = mlflow.MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
                if experiment is not None and client.get_experiment_by_name(experiment) is None:
                    client.create_experiment(experiment)
            except Exception as err:  # noqa: BLE001 - sqlalchemy/MLflow raise many kinds; the user needs the file and the cause
                text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                hint = ("another process holds it locked: wait for it or stop it" if "locked" in text
                        else "it cannot be written (disk full, read-only or a file-size limit): free space and rerun"
                        if any(w in text for w in ("disk I/O", "disk is full", "readonly", "read-only")) else
                        "it is not an MLflow store (corrupt, or another program's file): move it aside to start a new one")
                raise StageError(f"the tracking store {db} is unusable ({text}); {hint}") from None
    elif uri.startswith(("http://", "https://")):
        err = wait_healthy(uri, wait_s, "MLflow tracking server", lambda m: log.warning("%s", m))
        if err is not None:
            raise StageError(f"MLflow tracking server {redact(uri)} does not answer ({err}); start it (make services) or unset MLFLOW_TRACKING_URI")
    return uri


def process_tags() -> dict[str, str]:
    import socket

    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid())}


def reconcile_stale_runs(experiment: str) -> list[str]:
    """Runs of this experiment left RUNNING by a process of this host that no longer exists
    (SIGKILL, a lost machine) are marked KILLED; returns their ids."""
    import socket

    import mlflow

    from tasks.lib.process import alive

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    stale = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        pid = run.data.tags.get("process.pid", "")
        if run.data.tags.get("process.host") == host and pid.isdigit() and not alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    if stale:
        log.warning("marked %d run(s) of dead processes KILLED: %s", len(stale), ", ".join(stale))
    return stale


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any], inputs: Mapping[str, Path], tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage (nested under the pipeline's run when there is one)."""
    import mlflow  # heavy (~3 s): imported on first use

    mlflow.set_tracking_uri(ensure_store(experiment=experiment))
    mlflow.set_experiment(experiment)
    reconcile_stale_runs(experiment)
    parent = os.environ.get(PARENT_ENV) or None
    all_tags = {"stage": stage, **git_commit(), **input_hashes(inputs), **process_tags(), **(tags or {})}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=all_tags, log_system_metrics=True) as run:
        flat = {k: ("" if v is None else str(v)[:500]) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps one batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))
        log_inputs(inputs)
        yield run


def path_size(p: Path) -> tuple[int, int]:
    """(bytes, files) under a file or folder (hidden temporaries left out)."""
    if p.is_file():
        return p.stat().st_size, 1
    files = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)] if p.is_dir() else []
    return sum(f.stat().st_size for f in files), len(files)


def log_inputs(inputs: Mapping[str, Path], lock_path: str | Path = "dvc.lock") -> None:
    """Each input as an MLflow dataset of the run (the *Dataset* column of MLflow's UI): named by
    its role, its source the path, its digest the `dvc.lock` hash of the stage that made it,
    with its size in bytes and files as tags."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    hashes = input_hashes(inputs, lock_path)
    datasets, contexts, tags = [], [], []
    for name, p in inputs.items():
        p = Path(p)
        size, files = path_size(p)
        digest = hashes.get(f"input.{name}") or None
        with warnings.catch_warnings():  # a local path matches two equal source kinds; either is right
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(p.resolve().as_uri())
        datasets.append(MetaDataset(source=source, name=f"{name}:{p}", digest=digest))
        contexts.append("input")
        tags.append({"bytes": str(size), "files": str(files), "dvc.hash": digest or "not yet in dvc.lock"})
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(numeric_metrics(metrics), step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path)
    elif p.is_file():
        mlflow.log_artifact(str(p), artifact_path)
