"""Serve the pipeline flow as a Prefect deployment on a cron schedule.

    prefect server start --host 127.0.0.1                         # terminal 1: API + UI on :4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve  # terminal 2

The deployment (`orchestration.deployment_name`, schedule `orchestration.cron` in the time
zone `orchestration.timezone`, params.yaml) then appears under Deployments in the Prefect UI; this process polls for its
scheduled runs and executes them. `--register-only` creates or updates the deployment and
exits, which is how the tests check it. `make services` starts this process against local
servers (infra/run-local.sh).

Work pools (`orchestration.work_pool`, `orchestration.gpu_work_pool`): with `work_pool` set,
the pipeline's deployment goes on that Prefect work pool instead of being served here, and a
worker runs it (`prefect worker start --pool NAME` in the project folder); with
`gpu_work_pool` set, the deployment `gpt-stage/NAME` is registered on that pool too, and the
pipeline sends its stages with a `compute` block there (a worker on a GPU machine that sees
the project folder at the same path). A pool that does not exist is created as a `process`
pool; one that exists is used as it is (its type is yours: process, docker, kubernetes). A Prefect API or MLflow server that does not answer stops it
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


def _description(params: Params) -> str:
    orch = params.orchestration
    where = f"; the stages with a compute block run on work pool '{orch.gpu_work_pool}'" if orch.gpu_work_pool else ""
    return (f"The whole GPT pipeline (data, pretrain, SFT, reward model, PPO, evaluation) through DVC, "
            f"which skips what is up to date; cron '{orch.cron}' in {orch.timezone}{where}.")


def build_deployment(params: Params, project: str):
    """The pipeline's deployment as this process serves it (orchestration.work_pool null)."""
    orch = params.orchestration
    return pipeline.to_deployment(
        name=orch.deployment_name,
        schedules=[Cron(orch.cron, timezone=orch.timezone)],
        parameters={"project": str(Path(project).resolve())},
        description=_description(params),
        tags=["gpt-pipeline"],
    )


def ensure_pool(name: str) -> str:
    """The work pool `name`, created as a process pool if the API has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            print(f"work pool '{name}' created (type process)")
            return "process"


def register_on_pools(params: Params, project: str) -> list[str]:
    """Register the deployments that work pools run (see the module's docstring); returns
    'flow/deployment on pool' lines."""
    from flows.pipeline import STAGE_FLOW, stage_flow

    orch, root = params.orchestration, str(Path(project).resolve())
    done = []
    if orch.work_pool:
        ensure_pool(orch.work_pool)
        pipeline.from_source(source=root, entrypoint="flows/pipeline.py:pipeline").deploy(
            name=orch.deployment_name, work_pool_name=orch.work_pool, schedules=[Cron(orch.cron, timezone=orch.timezone)],
            parameters={"project": root}, description=_description(params), tags=["gpt-pipeline"], build=False, push=False,
            print_next_steps=False)
        done.append(f"{pipeline.name}/{orch.deployment_name} on work pool '{orch.work_pool}'")
    if orch.gpu_work_pool:
        ensure_pool(orch.gpu_work_pool)
        stage_flow.from_source(source=root, entrypoint="flows/pipeline.py:stage_flow").deploy(
            name=orch.gpu_work_pool, work_pool_name=orch.gpu_work_pool, tags=["gpt-pipeline"], build=False, push=False,
            description=f"One stage of the GPT pipeline in {root} (what the pipeline sends to work pool '{orch.gpu_work_pool}').",
            print_next_steps=False)
        done.append(f"{STAGE_FLOW}/{orch.gpu_work_pool} on work pool '{orch.gpu_work_pool}'")
    return done


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
    orch = params.orchestration
    for line in register_on_pools(params, args.project):
        print(f"deployment {line}")
    if orch.work_pool:  # a worker of that pool runs the pipeline, not this process
        pools = [orch.work_pool, *([orch.gpu_work_pool] if orch.gpu_work_pool else [])]
        print("start a worker for each pool, in the project folder: " + "; ".join(f"prefect worker start --pool {p}" for p in pools))
        return 0
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
