"""Shared fixtures: isolated MLflow/Prefect state, tiny parameters, a throwaway project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Tracking into a throwaway SQLite file, Prefect state in a temp dir, a git identity."""
    d = tmp_path_factory.mktemp("state")
    saved = dict(os.environ)
    os.environ.update({
        "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db",
        "PREFECT_HOME": str(d / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    os.environ.pop("GPT_PIPELINE_PARENT_RUN_ID", None)
    yield d
    os.environ.clear()
    os.environ.update(saved)


def tiny_raw_params() -> dict:
    """The default params.yaml shrunk to seconds: fewer documents, a small vocabulary."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    by_name = {s["name"]: s for s in raw["collect"]["sources"]}
    by_name["python_docs"]["limit"] = 120
    by_name["python_code"]["limit"] = 12
    by_name["web_crawl"]["num_docs"] = 300
    by_name["web_archive"]["limit"] = 4
    raw["tokenizer"]["vocab_size"] = 600
    raw["executor"]["workers"] = 1  # in-process: fast to start; the pool and Ray have tests of their own
    # training stages: a one-layer model and a handful of steps
    raw["model"].update(n_layer=1, n_head=2, d_model=32, max_seq_len=192)
    small = {"batch_size": 4, "eval_every": 2, "eval_batches": 1, "ckpt_every": 2, "warmup_steps": 0}
    halves = {**small, "batch_size": 2, "grad_accum": 2}  # accumulation exercised; two processes can split it
    raw["pretrain"].update(seq_len=64, sample_tokens=8)
    raw["pretrain"]["train"].update(steps=4, **small)
    raw["instructions"]["sources"] = [{"name": "python_qa", "kind": "builtin", "corpus": "python_qa", "limit": 300}]
    raw["sft"]["train"].update(steps=4, **halves)
    # the gold labeler needs a model good enough to avoid ties; end to end uses the human file
    raw["preferences"].update(labeler="file", val_fraction=0.25, test_fraction=0.25, prompts=12, k=2)  # each split gets an example
    raw["paths"]["human_preferences"] = "examples/preferences.jsonl"
    raw["preferences"]["sampling"]["max_new_tokens"] = 8
    raw["reward"]["train"].update(steps=4, **halves)
    raw["ppo"].update(steps=2, batch_prompts=4, ckpt_every=1, value_warmup=1)
    raw["ppo"]["sampling"]["max_new_tokens"] = 8
    raw["group_rl"].update(steps=2, batch_prompts=2, group_size=2, ckpt_every=1)
    raw["group_rl"]["sampling"]["max_new_tokens"] = 8
    raw["dpo"].update(kl_prompts=2, kl_max_new_tokens=4)
    raw["dpo"]["train"].update(steps=4, **halves)
    # about 18 held-out prompts: an interval up to +-0.5 wide is all they can promise
    raw["evaluate"].update(samples_per_prompt=2, best_of_n=2, sft_temperatures=[0.0], max_ci_half_width=0.5, bootstrap_resamples=200)
    raw["evaluate"]["sampling"]["max_new_tokens"] = 8
    for section in ("pretrain", "sft", "preferences", "reward", "ppo", "group_rl", "dpo", "evaluate"):
        raw[section]["compute"]["device"] = "cpu"  # CPU tests stay on the CPU on a GPU machine too
    return raw


def cfg(dotted: str, **overrides):
    """A section of the tiny params (e.g. `cfg("quality.rules", min_words=500)`), validated."""
    from tasks.config import parse_params

    section = parse_params(tiny_raw_params())
    for part in dotted.split("."):
        section = getattr(section, part)
    return type(section).model_validate({**section.model_dump(), **overrides})


def train_cfg(steps: int, **overrides):
    """A TrainConfig for unit tests: no warmup, evaluation and checkpoints only when asked."""
    base = {"steps": steps, "batch_size": 4, "warmup_steps": 0, "eval_every": 1000, "ckpt_every": 1000, "lr": 3e-3}
    return cfg("pretrain.train", **{**base, **overrides})


def runtime(device: str = "cpu", dtype: str = "auto", compile: bool = False, strategy: str = "ddp"):
    from tasks.lib.runtime import Runtime

    return Runtime(cfg("pretrain.compute", device=device, dtype=dtype, compile=compile, strategy=strategy))


# Under mutmut (`make mutants`) this process's __main__ is mutmut's script. A worker process that
# a stage spawns would run that script again on start, and mutmut reads its config from the
# folder the test works in and fails, so the test would fail whatever the mutant (a false kill).
# The workers need only tasks.*: they start without the parent's __main__.
if "MUTANT_UNDER_TEST" in os.environ:
    import multiprocessing.spawn as _spawn

    _preparation_data = _spawn.get_preparation_data

    def _without_main(name):
        data = _preparation_data(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    _spawn.get_preparation_data = _without_main


@pytest.fixture(autouse=True)
def mutmut_stats_stay_in_this_process(monkeypatch):
    """Under mutmut's stats run a spawned worker would record which tests reach which function, and
    that needs mutmut's config from the test's folder. Its record would be lost anyway (mutmut keeps
    it in this process), so workers run the plain code there; this process keeps mutmut's own copy
    of the setting. Mutants themselves (every later run) still reach the workers."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        monkeypatch.delenv("MUTANT_UNDER_TEST")


@pytest.fixture
def tiny_params():
    from tasks.config import parse_params

    return parse_params(tiny_raw_params())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run stage functions with relative paths inside a temp dir."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(module, params):
    """Call a stage's pure run() with the paths its module declares."""
    from tasks.stage import resolve

    # sources fingerprints the rankings file that the tiny params' labeler reads
    # (examples/preferences.jsonl, relative to the folder the stage runs in)
    rankings = Path(params.paths.human_preferences)
    if module.STAGE == "sources" and params.preferences.labeler == "file" and not rankings.exists():
        source = REPO / rankings
        if source.is_file():
            rankings.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, rankings)
    return module.run(params, resolve(params, module.STAGE, module.INPUTS), resolve(params, module.STAGE, module.OUTPUTS))


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_project(proj: Path, raw: dict | None = None) -> Path:
    """A throwaway copy of the project (code, dvc.yaml, tiny params) as its own git + DVC repo."""
    proj.mkdir(parents=True)
    for name in ("tasks", "flows", "examples"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    (proj / "params.yaml").write_text(yaml.safe_dump(raw or tiny_raw_params(), sort_keys=False))
    (proj / ".gitignore").write_text("mlflow.db\nmlflow.db.lock\nmlflow.db.registry.lock\nmlruns/\n__pycache__/\n")
    git(proj, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=proj, check=True)
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "init")
    return proj


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "proj")


def dvc(proj, *args, check=True, env=None):
    env = env or {**os.environ, "PYTHONPATH": str(proj)}
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


CHROME = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
DRIVER = shutil.which("chromedriver")


def headless_chrome(profile: Path, window: str):
    """Debian's chromium through its chromedriver, headless, with a profile of its own (Selenium)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size={window}",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
