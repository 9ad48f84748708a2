"""End to end on a throwaway project: DVC skips and reruns, Prefect gives the same outputs,
MLflow records nested stage runs, the deployment registers with its cron schedule."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import dvc

pytestmark = pytest.mark.slow
STAGES = ["collect", "quality", "dedup", "mix", "tokenizer", "tokenize", "pretrain", "sft", "preferences", "reward", "ppo", "evaluate"]


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient()


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def lock_outs(proj) -> dict[str, str]:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    # reports/ hold metrics, which include wall-clock seconds; the data and models must match
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", []) if not o["path"].startswith("reports/")}


def test_dvc_repro_skip_and_partial_rerun(project):
    first = dvc(project, "repro")
    assert ran(first.stdout) == STAGES
    assert (project / "data/tokens/train.bin").stat().st_size > 0
    for model in ("base", "sft", "reward", "rlhf"):
        assert (project / "models" / model / "model.safetensors").is_file()
    # the report shows the three models side by side, and the first RLHF version is champion
    report = json.loads((project / "reports/eval.json").read_text())
    for m in ("base", "sft", "rlhf"):
        for key in ("val_perplexity", "sft_val_loss", "rm_score", "gold_score", "distinct_1", "distinct_2",
                    "mean_token_entropy", "self_similarity", "response_length", "finished_share"):
            assert key in report["models"][m], (m, key)
    assert "win_rate_vs_sft_rm" in report["models"]["rlhf"] and "win_rate_vs_sft_rm" not in report["models"]["sft"]
    assert report["promotion"]["decision"] == "champion"
    md = (project / "reports/eval.md").read_text()
    assert "| metric | base | sft | rlhf |" in md and "## Samples" in md and "**Promotion**" in md
    assert {p.name for p in (project / "reports/eval_plots").iterdir()} == {"training_curves.png", "ppo_reward_vs_kl.png", "score_distributions.png"}
    assert str(mlflow_client().get_model_version_by_alias("rlhf", "champion").version) == report["promotion"]["candidate_version"]

    again = dvc(project, "repro")
    assert ran(again.stdout) == [] and "up to date" in again.stdout
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "run"], cwd=project, check=True)
    # a quality threshold changes: only quality and what follows run again
    exp = dvc(project, "exp", "run", "-S", "quality.rules.min_words=60")
    assert ran(exp.stdout) == STAGES[1:], exp.stdout
    assert "Stage 'collect' didn't change" in exp.stdout
    metrics = json.loads((project / "reports/quality.json").read_text())
    assert metrics["sources"]["python_docs"]["dropped"]["too_few_words"] > 0

    # every trained model is a registered version linked to its run, with lineage tags
    client = mlflow_client()
    for name, parent in (("base", None), ("sft", "base"), ("reward", "sft"), ("rlhf", "sft")):
        versions = client.search_model_versions(f"name = '{name}'")
        assert versions, name
        v = max(versions, key=lambda v: int(v.version))
        assert v.run_id and client.get_run(v.run_id).data.tags["stage"] == ("pretrain" if name == "base" else "ppo" if name == "rlhf" else name)
        assert v.tags["git.commit"] != "unknown"
        if parent:
            assert v.tags["parent_model"].startswith(f"{parent}/")

    # MLflow: one run per executed stage, with its metrics, tagged with commit and input hashes
    import mlflow

    runs = mlflow.search_runs(experiment_names=["gpt-pipeline"], filter_string="tags.stage = 'quality'", output_format="list")
    assert len(runs) >= 2
    latest = runs[0]
    assert latest.data.metrics["kept"] > 0 and "classifier.auc" in latest.data.metrics
    assert latest.data.tags["git.commit"] != "unknown" and latest.data.tags["input.raw"]
    assert latest.data.params["quality.rules.min_words"] == "60"


def test_bad_params_fail_dvc_with_a_clear_message(project):
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["collect"]["max_chars"] = "lots"
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    res = dvc(project, "repro", "collect", check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "collect.max_chars = 'lots'" in out and "Traceback" not in out


def test_prefect_flow_matches_dvc_and_nests_mlflow_runs(project, tmp_path):
    import shutil

    from prefect.testing.utilities import prefect_test_harness

    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    dvc(project, "repro")
    with prefect_test_harness():
        from flows.pipeline import pipeline

        results = pipeline(project=str(twin))
        assert [r["stage"] for r in results] == STAGES and all(r["ran"] for r in results)
        by_stage = {r["stage"]: r for r in results}
        assert by_stage["tokenize"]["metrics"]["train_tokens"] > 0
        assert by_stage["evaluate"]["metrics"]["promotion"]["decision"] in ("champion", "challenger", "unchanged")
        again = pipeline(project=str(twin))
        assert not any(r["ran"] for r in again)  # DVC's skipping, seen through Prefect
    assert lock_outs(twin) == lock_outs(project)  # same outputs, byte for byte

    import mlflow

    parents = mlflow.search_runs(experiment_names=["gpt-pipeline"], filter_string="tags.pipeline = 'true'", output_format="list")
    first_parent = parents[-1]
    children = mlflow.search_runs(experiment_names=["gpt-pipeline"], filter_string=f"tags.mlflow.parentRunId = '{first_parent.info.run_id}'", output_format="list")
    assert sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
    assert first_parent.data.metrics["stages_run"] == len(STAGES)


def test_deployment_registers_with_cron(project):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        from prefect.client.orchestration import get_client

        from flows.serve import build_deployment
        from tasks.config import load_params

        params = load_params(project / "params.yaml")
        build_deployment(params, str(project)).apply()
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"gpt-pipeline/{params.orchestration.deployment_name}")
        assert dep.schedules and dep.schedules[0].schedule.cron == params.orchestration.cron
        assert dep.parameters["project"] == str(project.resolve())
