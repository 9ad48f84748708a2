"""The one entry point behind every `python -m tasks.<stage>`.

A stage module declares what it reads and writes and a pure function:

    STAGE = "dedup"                      # the DVC stage
    PARAMS = ("seed", "collect.sources", "dedup")   # the params.yaml keys it reads (dvc.yaml `params`)
    INPUTS = ("filtered",)               # keys of `paths` it reads (dvc.yaml `deps`)
    OUTPUTS = ("dedup", "report")        # keys of `paths` it writes; "report" is reports/<stage>/,
                                         # "checkpoints" is checkpoints/<stage>/ (resume state)
    def run(params, inputs, outputs) -> metrics

`main` parses `params.yaml` (validated, clear errors), resolves the paths, opens the
stage's MLflow run, calls `run`, writes the metrics to `reports/<stage>.json` (the DVC
metrics file; figures that change from run to run, like seconds, go to MLflow only) and logs
the metrics, the resolved config and the report folder to MLflow. A stage whose compute block
asks for several processes relaunches itself under torchrun (`relaunch`).

A bad `params.yaml` or a bad input ends the process with exit code 2 and one readable
message, not a traceback. SIGTERM and Ctrl-C end it with the MLflow run marked KILLED.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks.config import ConfigError, Params, load_params, section_dict
from tasks.lib.errors import StageError
from tasks.lib.process import die_with_parent
from tasks.lib.storage import check_output_paths, clean_stale, write_json

EXIT_BAD_INPUT = 2


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks and run bookkeeping run."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated()


PER_STAGE = {"report": "reports", "checkpoints": "checkpoints"}  # folders with one subfolder per stage


def resolve(params: Params, stage: str, keys: Sequence[str]) -> dict[str, Path]:
    """Paths of a stage's inputs or outputs: `paths.<key>`, or `<folder>/<stage>` for the
    per-stage folders (reports/<stage>/, checkpoints/<stage>/)."""
    return {k: Path(getattr(params.paths, PER_STAGE[k])) / stage if k in PER_STAGE else Path(getattr(params.paths, k)) for k in keys}


def clean_all_stale(params: Params) -> None:
    """What killed writers left beside any stage's outputs (temporaries, a previous output moved
    aside): cleaned or put back at the start of every stage, not only by the stage that left
    them, because DVC may restore a killed stage's outputs from its run cache without running it."""
    import re

    from tasks.config import INPUT_ONLY_PATHS

    outputs = [Path(v) for k, v in params.paths.model_dump().items() if k not in INPUT_ONLY_PATHS and k != "output_roots"]
    folders = {p.parent for p in outputs} | {Path(params.paths.reports), Path(params.paths.checkpoints)}
    leftover = re.compile(r"^\.(.+)\.(tmp|old)-\d+")
    for folder in folders:
        if folder.is_dir():
            for name in sorted({m.group(1) for m in map(leftover.match, (p.name for p in folder.iterdir())) if m}):
                clean_stale(folder / name)


def metrics_path(params: Params, stage: str) -> Path:
    return Path(params.paths.reports) / f"{stage}.json"


def torchrun_command(compute: Any, module: str, argv: list[str]) -> list[str]:
    """The torchrun line that runs `python -m <module> <argv>` on nproc_per_node processes of this
    node: standalone on one node (a free local port), a c10d rendezvous at rdzv_endpoint across
    nodes (the same command on every node; the node that owns the address hosts it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={compute.nproc_per_node}", f"--nnodes={compute.nnodes}"]
    if compute.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={compute.rdzv_endpoint}", f"--rdzv_id={module}",
                f"--rdzv_conf=join_timeout={compute.rdzv_timeout}"]
    return [*cmd, "-m", module, *argv]


def _is_local(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))  # only an address of this machine can be bound
        except OSError:
            return False
    return True


def check_rendezvous(endpoint: str, timeout: float) -> None:
    """Fail early and by name when the first node's rendezvous address cannot be reached:
    a host that does not resolve at once, one that does not answer within `timeout` seconds
    (it may start after this node: wait for it). The node that owns the address hosts it."""
    host, port = endpoint.rsplit(":", 1)
    try:
        addrs = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise StageError(f"compute.rdzv_endpoint = {endpoint}: the host {host!r} does not resolve ({err}); "
                         "give the first node's address, the same on every node") from None
    if any(_is_local(a[4][0]) for a in addrs):
        return
    log = logging.getLogger("runtime")
    t0 = last = time.monotonic()
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout)).close()
            return
        except OSError as err:
            waited = time.monotonic() - t0
            if waited >= timeout:
                raise StageError(f"compute.rdzv_endpoint = {endpoint} does not answer after {waited:.0f} s ({err}): start the stage "
                                 "on the first node (the one with that address), check the address and that the port is open, "
                                 "or raise compute.rdzv_timeout") from None
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                log.info("waiting for the rendezvous at %s (%.0f s of %d)", endpoint, waited, timeout)
            time.sleep(min(1.0, max(timeout - waited, 0.01)))


def relaunch(module: ModuleType, compute: Any, params_file: str) -> int:
    """The stage again under torchrun, on the processes its compute block asks for (DDP or FSDP): rank 0
    of the new processes tracks, writes and registers; the others train. SIGTERM or Ctrl-C
    here stops torchrun, which stops its processes."""
    import subprocess

    stage = module.STAGE
    if compute.nnodes > 1:
        check_rendezvous(compute.rdzv_endpoint, compute.rdzv_timeout)
    cmd = torchrun_command(compute, module.__spec__.name, ["--params", params_file])
    logging.getLogger(stage).info("%d processes (%d per node x %d node(s)) under torchrun, %s: %s", compute.world,
                                  compute.nproc_per_node, compute.nnodes, compute.strategy.upper(), " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)  # noqa: PLW1509 - before any thread of ours starts
    try:
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun passes it to its processes; rank 0 marks its MLflow run KILLED
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        print(f"error: {stage}: the torchrun processes failed (exit code {rc}); the first error is above", file=sys.stderr)
    return rc


def main(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    stage: str = module.STAGE
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=(module.__doc__ or "").split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s", stream=sys.stderr)
    from tasks.lib.tracking import RedactFilter, redact

    for handler in logging.getLogger().handlers:  # no credential of a server URI in any line
        handler.addFilter(RedactFilter())
    logging.captureWarnings(True)
    for noisy in ("mlflow", "alembic", "matplotlib", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger(stage)
    signal.signal(signal.SIGTERM, _on_sigterm)
    die_with_parent()

    try:
        params = load_params(args.params)
        ins, outs = resolve(params, stage, module.INPUTS), resolve(params, stage, module.OUTPUTS)
        check_output_paths({**outs, "metrics": metrics_path(params, stage)}, params.paths.output_roots, Path.cwd(), tracked_ok=("metrics",))
        clean_all_stale(params)
        for name, p in ins.items():
            if not p.exists():
                raise StageError(f"input '{name}' ({p}) does not exist: run the upstream stage first (dvc repro {stage})")

        compute = getattr(getattr(params, stage, None), "compute", None)
        if compute is not None and compute.world > 1 and "WORLD_SIZE" not in os.environ:
            return relaunch(module, compute, args.params)
        if int(os.environ.get("RANK", "0")) > 0:  # DDP worker: rank 0 tracks and writes reports
            module.run(params, ins, outs)
            return 0
        from tasks.lib import tracking

        logged = {k: section_dict(params, k) for k in (*module.PARAMS, *getattr(module, "UNTRACKED", ()))}
        with tracking.stage_run(stage, params.mlflow.experiment, logged, ins):
            import mlflow

            try:
                mlflow.log_dict(logged, "resolved_params.json")
                t0 = time.time()
                metrics: dict[str, Any] = module.run(params, ins, outs)
                seconds = time.time() - t0
                report = metrics_path(params, stage)
                write_json(report, metrics)
                tracking.log_metrics(metrics, step=int(metrics.get("steps") or metrics.get("iterations") or 0))
                tracking.log_metrics({"seconds": seconds})
                tracking.log_artifact(report, "reports")
                if "report" in outs:
                    tracking.log_artifact(outs["report"], f"reports/{stage}")
            except (KeyboardInterrupt, Terminated):
                mlflow.end_run("KILLED")
                raise
        log.info("done in %.1f s; metrics in %s", seconds, report)
        return 0
    except (ConfigError, StageError) as err:
        print(f"error: {stage}: {redact(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - only MLflow's failures are turned into a line; the rest is a bug to see whole
        if type(err).__module__.split(".")[0] != "mlflow":
            raise
        from tasks.lib.tracking import tracking_uri

        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        print(f"error: {stage}: MLflow at {redact(tracking_uri())} failed while recording this run ({redact(first)}); "
              "outputs already written stay, but DVC has not recorded the stage: rerun it once the tracking server answers "
              "(the run left open is marked KILLED then)", file=sys.stderr)
        return 1
    except OSError as err:
        from tasks.lib.storage import _NO_SPACE

        if err.errno not in _NO_SPACE:
            raise
        print(f"error: {stage}: cannot write {err.filename or 'an output'}: {_NO_SPACE[err.errno]}; free space or fix the "
              "folder's permissions, then rerun", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"error: {stage}: terminated (SIGTERM)", file=sys.stderr)
        return 143
