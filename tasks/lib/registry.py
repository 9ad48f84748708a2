"""MLflow model registry: register a checkpoint as a version of a named model, once.

The checkpoint (safetensors + config.json + tokenizer) is logged inside an MLflow `pyfunc`
model (tasks/lib/pyfunc_model.py, logged as code, not pickled) that generates text, so
`mlflow.pyfunc.load_model("models:/sft@champion")` gives a model that answers prompts, and
the raw checkpoint stays a plain artifact. Versions are identified by the SHA-256 of
`model.safetensors` (the `checkpoint.sha256` tag): registering weights that already have a
version returns that version instead of adding a duplicate, so reruns that reproduce the
same weights (`dvc repro -f`, a fresh clone against a shared server) register nothing new.

Each version is tagged with its lineage: git commit, the `dvc.lock` hashes of its inputs and,
when the parent is registered, the parent's version (`parent_model: sft/3`); the parent's
checkpoint hash is tagged in every case (`parent.checkpoint.sha256`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mlflow

from tasks.lib.hashing import file_hash

log = logging.getLogger("registry")


def checkpoint_sha(folder: Path) -> str:
    return file_hash(Path(folder) / "model.safetensors")


def _versions(name: str) -> list:
    try:
        return list(mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))
    except mlflow.exceptions.MlflowException:
        return []


def version_by_sha(name: str, sha: str) -> str | None:
    """The oldest version of `name` holding these exact weights, or None."""
    match = [int(v.version) for v in _versions(name) if v.tags.get("checkpoint.sha256") == sha]
    return str(min(match)) if match else None


def version_of(name: str, folder: Path) -> str | None:
    """The registered version of `name` holding exactly this checkpoint, or None."""
    if not (Path(folder) / "model.safetensors").is_file():
        return None
    return version_by_sha(name, checkpoint_sha(folder))


def parent_tags(name: str, folder: Path) -> dict[str, str]:
    """Lineage tags naming the checkpoint a model was trained from."""
    sha = checkpoint_sha(folder)
    tags = {"parent.checkpoint.sha256": sha}
    version = version_by_sha(name, sha)
    if version is not None:
        tags["parent_model"] = f"{name}/{version}"
    return tags


def requirements() -> list[str]:
    """The packages the served model needs, pinned to the versions that trained it."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "tokenizers", "safetensors", "numpy")]


def signature():
    """Prompts in, completions out, and the generation settings as params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts, or a DataFrame with one column of them
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 64),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", 0),
        ]),
    )


def register_checkpoint(name: str, folder: Path, tags: dict[str, str], description: str | None = None) -> str | None:
    """Register `folder` as a version of `name`, logged in the active run; when these exact
    weights are registered already, return that version and add nothing. None without an
    active run.

    Idempotent under kills and races: the version is created with its `checkpoint.sha256`
    tag in the same call (a kill cannot leave an untagged version); registrations of one
    local store are serialised by a file lock; against a server, a registration that finds a
    version of the same weights older than its own afterwards (two at the same moment)
    deletes its own and returns the older one, so both end with one version."""
    if mlflow.active_run() is None:
        return None
    sha = checkpoint_sha(folder)
    with _registry_lock():
        existing = version_by_sha(name, sha)
        if existing is not None:
            log.info("%s: these weights are version %s already; nothing registered", name, existing)
            return existing
        code = Path(__file__).resolve().parents[1]
        with warnings.catch_warnings():
            # log_model installs its own "once" filter in front of any of ours, then advises in
            # ANSI colours (type hints; an input example, which would load the model once more):
            # the advice goes to the debug log instead of every training stage's output
            warnings.showwarning = lambda message, *args, **kwargs: log.debug("mlflow: %s", message)
            info = _log(name, folder, code)
            mv = mlflow.register_model(info.model_uri, name, tags={**{k: str(v) for k, v in tags.items()}, "checkpoint.sha256": sha})
        version = str(mv.version)
        oldest = version_by_sha(name, sha)
        if oldest is not None and oldest != version:  # another process registered the same weights meanwhile
            mlflow.MlflowClient().delete_model_version(name, version)
            log.info("%s: version %s of these weights was registered at the same moment; kept it, removed %s", name, oldest, version)
            return oldest
    if description:  # the model card in MLflow's UI
        mlflow.MlflowClient().update_model_version(name, version, description=description[:5000])
    log.info("registered %s version %s", name, version)
    return version


def model_card(name: str, stage: str, inputs: dict[str, str], settings: dict[str, Any], figures: dict[str, Any], labeler: str | None = None) -> str:
    """A short model card for a version's description: what it was trained on (inputs with
    their DVC hashes), the settings that matter, its figures, and who labelled its preferences."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"**{name}**, made by the `{stage}` stage of gpt-pipeline.", ""]
    if labeler:
        lines += [f"Preferences labelled by: **{labeler}** ({'people' if labeler == 'human' else 'the programmatic gold judge' if labeler == 'judge' else 'people and the judge'}).", ""]
    lines += ["Inputs: " + ", ".join(f"`{k}` ({v[:12]})" for k, v in inputs.items()) if inputs else "Inputs: see the run's datasets.", ""]
    lines += ["Settings: " + ", ".join(f"{k}={fmt(v)}" for k, v in settings.items()), ""]
    lines += ["Figures: " + ", ".join(f"{k} {fmt(v)}" for k, v in figures.items() if v is not None)]
    return "\n".join(lines)


def append_description(name: str, version: str, text: str) -> None:
    """Add a paragraph (evaluation, promotion) to a version's model card, replacing an earlier
    paragraph that starts with the same first line."""
    client = mlflow.MlflowClient()
    current = client.get_model_version(name, version).description or ""
    head = text.splitlines()[0]
    kept = [p for p in current.split("\n\n") if not p.startswith(head)]
    client.update_model_version(name, version, description="\n\n".join([*kept, text])[:5000])


def _registry_lock():
    """An exclusive lock beside a local SQLite store (registrations of one machine take turns);
    nothing for a server, whose registrations are made idempotent after the fact."""
    import contextlib
    import fcntl

    from tasks.lib.tracking import tracking_uri

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked():
        db = Path(uri.removeprefix("sqlite:///"))
        with open(db.with_name(db.name + ".registry.lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    return locked()


def _log(name: str, folder: Path, code: Path):
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(code / "lib" / "pyfunc_model.py"),  # models from code: no pickled object
        artifacts={"checkpoint": str(folder)},
        code_paths=[str(code)],  # the wrapper and the model code travel with the version
        pip_requirements=requirements(),
        signature=signature(),
    )


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


def resolve_uri(uri: str, warn=None) -> tuple[str, tuple[str, str]]:
    """`models:/<name>@<alias>`, `models:/<name>/<version>` or `models:/<name>@latest` made
    concrete: (`models:/<name>/<version>`, (name, version)). When the alias does not exist
    (a fresh run may end with `challenger` and no `champion`: promotion must be earned), the
    best version that exists is used, and `warn` (default: stderr) gets a line saying which
    and why: the highest `eval.gold_score` among evaluated versions, else the newest."""
    import re
    import sys

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri.strip())
    if not m:
        raise FileNotFoundError(f"{uri}: not a registered model URI (models:/<name>@<alias> or models:/<name>/<version>)")
    name, alias, number = m.groups()
    versions = _versions(name)
    if not versions:
        raise FileNotFoundError(f"{uri}: no registered model '{name}' in {mlflow.get_tracking_uri()} (run the pipeline first)")
    if number is not None:
        if number not in {str(v.version) for v in versions}:
            raise FileNotFoundError(f"{uri}: '{name}' has no version {number} (it has {sorted(int(v.version) for v in versions)})")
        return uri, (name, number)
    if alias == "latest":
        v = str(max(int(x.version) for x in versions))
        return f"models:/{name}/{v}", (name, v)
    found = alias_version(name, alias)
    if found is not None:
        return f"models:/{name}/{found}", (name, found)

    def gold(v) -> float:
        try:
            return float(v.tags.get("eval.gold_score", "nan"))
        except ValueError:
            return float("nan")

    scored = [v for v in versions if gold(v) == gold(v)]
    best = max(scored, key=lambda v: (gold(v), int(v.version))) if scored else max(versions, key=lambda v: int(v.version))
    why = f"eval.gold_score {gold(best):.4f}, the best of the evaluated versions" if scored else "the newest version; none was evaluated"
    aliases = f", alias {', '.join(best.aliases)}" if getattr(best, "aliases", None) else ""
    (warn or (lambda line: print(line, file=sys.stderr)))(
        f"note: {uri} does not exist (no version of '{name}' has that alias{'; promotion must be earned' if alias == 'champion' else ''}); "
        f"using the best that exists: models:/{name}/{best.version} ({why}{aliases})")
    return f"models:/{name}/{best.version}", (name, str(best.version))
