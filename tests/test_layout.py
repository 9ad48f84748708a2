"""The layout rules: stages are leaves, dvc.yaml says exactly what each stage reads and
writes, the library knows nothing of params.yaml, and params.yaml is the one source of
every default."""

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, parse_params
from tasks.lib.deps import closure_relative
from tests.conftest import REPO, tiny_raw_params

SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(SPEC["stages"])
PER_STAGE = {"report": "${paths.reports}/%s", "checkpoints": "${paths.checkpoints}/%s"}


def declared(key: str, stage: str) -> str:
    return PER_STAGE[key] % stage if key in PER_STAGE else "${paths.%s}" % key


def out_path(o) -> str:
    return o if isinstance(o, str) else next(iter(o))


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_matches_the_stage_module(stage):
    spec, mod = SPEC["stages"][stage], importlib.import_module(f"tasks.{stage}")
    assert mod.STAGE == stage and spec["cmd"] == f"python -m tasks.{stage}"
    code = [d for d in spec["deps"] if not d.startswith("${")]
    data = [d for d in spec["deps"] if d.startswith("${")]
    assert sorted(code) == closure_relative(f"tasks.{stage}"), "code deps must be the module's import closure"
    assert data == [declared(k, stage) for k in mod.INPUTS]
    assert [out_path(o) for o in spec["outs"]] == [declared(k, stage) for k in mod.OUTPUTS]
    assert spec["params"] == list(mod.PARAMS)
    assert [out_path(m) for m in spec["metrics"]] == [f"${{paths.reports}}/{stage}.json"]


def test_stages_are_leaves_and_the_library_knows_no_params():
    stage_files = {f"tasks/{s}.py" for s in STAGES}
    for stage in STAGES:
        others = (set(closure_relative(f"tasks.{stage}")) & stage_files) - {f"tasks/{stage}.py"}
        assert not others, f"{stage} imports the stage module(s) {others}"
    for f in sorted((REPO / "tasks/lib").glob("*.py")):
        text = f.read_text()
        imported = {n.module for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m == "tasks.config" or m == "tasks.stage"}, f"{f.name} imports the config"
        assert not {m for m in imported if m.startswith("tasks.") and not m.startswith("tasks.lib")}, f"{f.name} imports a stage"


def test_package_inits_hold_only_docstrings():
    # they are left out of the import closure, so code in them would escape the deps check
    for init in [REPO / "tasks/__init__.py", REPO / "tasks/lib/__init__.py"]:
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


def test_every_module_opens_with_a_docstring():
    for f in [*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/*.py"), *REPO.glob("bench/*.py")]:
        assert ast.get_docstring(ast.parse(f.read_text())), f"{f.relative_to(REPO)} has no docstring"


def leaves(obj, prefix=()):
    """Every key path of params.yaml whose value is set (list items of sources excluded)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            if k not in ("sources", "weights", "split"):
                yield from leaves(v, prefix + (k,))


def test_params_yaml_is_the_one_source_of_defaults():
    """Removing any key from params.yaml is an error: no value silently comes from the code."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    parse_params(raw)
    for path in leaves(raw):
        broken = yaml.safe_load((REPO / "params.yaml").read_text())
        node = broken
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
        with pytest.raises(ConfigError, match=rf"{'.'.join(map(str, path))}: required key is missing"):
            parse_params(broken)


@pytest.mark.parametrize("cron, tz, msg", [("61 2 * * *", "UTC", "orchestration.cron"), ("every night", "UTC", "orchestration.cron"),
                                           ("0 2 * * *", "Mars/Olympus", "orchestration.timezone")])
def test_bad_schedule_is_a_config_error(cron, tz, msg):
    raw = tiny_raw_params()
    raw["orchestration"].update(cron=cron, timezone=tz)
    with pytest.raises(ConfigError, match=msg):
        parse_params(raw)


def test_dvc_plots_point_at_declared_report_folders():
    reports = {declared("report", s) for s in STAGES if "report" in importlib.import_module(f"tasks.{s}").OUTPUTS}
    for plot in SPEC["plots"]:
        (spec,) = plot.values()
        for f in spec["y"]:
            assert str(Path(f).parent) in reports, f
