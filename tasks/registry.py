"""MLflow model registry: register a checkpoint as a version of a named model.

The checkpoint (safetensors + config.json + tokenizer) is logged inside an MLflow `pyfunc`
model (tasks/pyfunc_model.py, logged as code, not pickled) that generates text, so `mlflow.pyfunc.load_model("models:/sft@champion")`
gives a model that answers prompts, and the raw checkpoint stays a plain artifact. Each
version is tagged with its lineage: git commit, the `dvc.lock` hashes of its inputs and the
registered version of the model it was trained from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

log = logging.getLogger("registry")


def register_checkpoint(name: str, folder: Path, tags: dict[str, str]) -> str | None:
    """Log `folder` as a pyfunc model in the active run and register it as a version of
    `name`; returns the version (None when there is no active run)."""
    if mlflow.active_run() is None:
        return None
    code = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(code / "pyfunc_model.py"),  # models from code: no pickled object
        artifacts={"checkpoint": str(folder)},
        code_paths=[str(code)],  # the wrapper and the model code travel with the version
        pip_requirements=["torch", "tokenizers", "safetensors", "numpy"],
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    log.info("registered %s version %s", name, version)
    return version


def latest_version(name: str) -> str | None:
    """The newest registered version of `name`, for lineage tags of models trained from it."""
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None
