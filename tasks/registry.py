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
    for k, v in {**tags, "checkpoint.sha256": checkpoint_sha(folder)}.items():
        client.set_model_version_tag(name, version, k, str(v))
    log.info("registered %s version %s", name, version)
    return version


def checkpoint_sha(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version_of(name: str, folder: Path) -> str | None:
    """The registered version of `name` holding exactly this checkpoint (the newest one if it
    was registered more than once), found by the `checkpoint.sha256` tag; None if not registered."""
    if not (Path(folder) / "model.safetensors").is_file():
        return None
    sha = checkpoint_sha(folder)
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    match = [int(v.version) for v in versions if v.tags.get("checkpoint.sha256") == sha]
    return str(max(match)) if match else None


def tag_version(name: str, version: str, tags: dict[str, Any]) -> None:
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None (no such model or alias)."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s", name, alias, version)


def download_checkpoint(model_uri: str) -> Path:
    """The checkpoint folder inside a registered version (`models:/rlhf@champion`, `models:/sft/3`)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = sorted(p.parent for p in local.rglob("model.safetensors") if (p.parent / "config.json").is_file())
    if not found:
        raise FileNotFoundError(f"{model_uri}: no checkpoint (model.safetensors + config.json) in the registered model")
    return found[0]
