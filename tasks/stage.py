"""The one entry point behind every `python -m tasks.<stage>`.

It parses `params.yaml` (validated, clear errors), resolves the stage's input and output
paths from its `paths` section, opens the stage's MLflow run, calls the stage's pure
`run(params, inputs, outputs) -> metrics`, writes the metrics to `reports/<stage>.json`
(the DVC metrics file) and logs metrics, the resolved config and the stage's report files
to MLflow.

A bad `params.yaml` or a bad input ends the process with exit code 2 and one readable
message, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, Params, load_params, section_dict
from tasks.storage import StageError, write_json

RunFn = Callable[[Params, dict[str, Path], dict[str, Path]], dict[str, Any]]


def resolve(params: Params, keys: Sequence[str]) -> dict[str, Path]:
    return {k: Path(getattr(params.paths, k)) for k in keys}


def metrics_path(params: Params, report: str) -> Path:
    return Path(params.paths.reports) / f"{report}.json"


def main(stage: str, run: RunFn, params_keys: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
         argv: Sequence[str] | None = None, report: str | None = None) -> int:
    """`report` names the stage's report files (default: the stage name): reports/<report>.json
    is the DVC metrics file; reports/<report>.md and reports/<report>_* go to MLflow too."""
    report_name = report or stage
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the '{stage}' stage.")
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger(stage)

    try:
        params = load_params(args.params)
        ins, outs = resolve(params, inputs), resolve(params, outputs)
        for name, p in ins.items():
            if not p.exists():
                raise StageError(f"input '{name}' ({p}) does not exist: run the upstream stage first (dvc repro)")

        if int(os.environ.get("RANK", "0")) > 0:  # DDP worker: rank 0 tracks and writes reports
            run(params, ins, outs)
            return 0
        from tasks import tracking

        logged = {k: section_dict(params, k) for k in params_keys}
        with tracking.stage_run(stage, params.mlflow.experiment, logged, ins):
            import mlflow

            mlflow.log_dict(logged, "resolved_params.json")
            t0 = time.time()
            metrics = run(params, ins, outs)
            metrics["seconds"] = round(time.time() - t0, 2)
            report = metrics_path(params, report_name)
            write_json(report, metrics)
            # training stages logged a history per step; their summary goes at the last step
            tracking.log_metrics(metrics, step=int(metrics.get("steps") or metrics.get("iterations") or 0))
            for f in [report, report.with_suffix(".md"), *sorted(report.parent.glob(f"{report_name}_*"))]:
                tracking.log_artifact(f, "reports")
        log.info("done in %.1f s; metrics in %s", metrics["seconds"], report)
        return 0
    except (ConfigError, StageError) as err:
        print(f"error: {stage}: {err}", file=sys.stderr)
        return 2
