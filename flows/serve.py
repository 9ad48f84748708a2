"""Serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start --host 127.0.0.1                         # terminal 1: API + UI on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve  # terminal 2

The deployment (`orchestration.deployment_name`, schedule `orchestration.cron` in the time
zone `orchestration.timezone`, params.yaml) then appears under Deployments in the Prefect UI; this process polls for its
scheduled runs and executes them. `--register-only` creates or updates the deployment and
exits, which is how the tests check it. `make services` starts this process against local
servers (infra/run-local.sh). A Prefect API or MLflow server that does not answer stops it
at start with one line naming the URL (exit code 2); once serving, it outlives restarts of
the Prefect server (its polling retries).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect.schedules import Cron

from flows.pipeline import ServiceUnavailable, ensure_services, pipeline
from tasks.config import Params, load_params


def build_deployment(params: Params, project: str):
    orch = params.orchestration
    return pipeline.to_deployment(
        name=orch.deployment_name,
        schedules=[Cron(orch.cron, timezone=orch.timezone)],
        parameters={"project": str(Path(project).resolve())},
        description=(f"The whole GPT pipeline (data, pretrain, SFT, reward model, PPO, evaluation) through DVC, "
                     f"which skips what is up to date; cron '{orch.cron}' in {orch.timezone}."),
        tags=["gpt-pipeline"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--project", default=".")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--register-only", action="store_true", help="create the deployment and exit")
    args = ap.parse_args(argv)
    try:
        ensure_services()
    except ServiceUnavailable as e:
        print(f"error: serve: {e}", file=sys.stderr)
        return 2
    params = load_params(str(Path(args.project) / args.params))
    deployment = build_deployment(params, args.project)
    if args.register_only:
        deployment_id = deployment.apply()
        print(f"deployment {pipeline.name}/{deployment.name} ({deployment_id}) cron '{params.orchestration.cron}' ({params.orchestration.timezone})")
        return 0
    from prefect import serve

    serve(deployment)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
