"""Serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start --host 127.0.0.1                         # terminal 1: API + UI on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve  # terminal 2

The deployment (`orchestration.deployment_name`, schedule `orchestration.cron` in
params.yaml) then appears under Deployments in the Prefect UI; this process polls for its
scheduled runs and executes them. `--register-only` creates or updates the deployment and
exits, which is how the tests check it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import pipeline
from tasks.config import Params, load_params


def build_deployment(params: Params, project: str):
    return pipeline.to_deployment(
        name=params.orchestration.deployment_name,
        cron=params.orchestration.cron,
        parameters={"project": str(Path(project).resolve())},
        description="The GPT pipeline (data stages through DVC), on a schedule.",
        tags=["gpt-pipeline"],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--project", default=".")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--register-only", action="store_true", help="create the deployment and exit")
    args = ap.parse_args(argv)
    params = load_params(Path(args.project) / args.params)
    deployment = build_deployment(params, args.project)
    if args.register_only:
        deployment_id = deployment.apply()
        print(f"deployment {pipeline.name}/{deployment.name} ({deployment_id}) cron '{params.orchestration.cron}'")
        return 0
    from prefect import serve

    serve(deployment)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
