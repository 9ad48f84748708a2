"""params.yaml validation: the shipped file loads, bad values give errors that name them."""

import subprocess
import sys

import pytest
import yaml

from tasks.config import ConfigError, load_params, parse_params
from tests.conftest import REPO, tiny_raw_params


def test_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert {s.name for s in params.collect.sources} == set(params.mix.weights)
    assert params.quality.classifier.apply_to_roles == ["crawl"]


def test_bad_value_names_key_and_value():
    raw = tiny_raw_params()
    raw["quality"]["rules"]["min_words"] = -5
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert "quality.rules.min_words" in msg and "-5" in msg


def test_unknown_key_is_rejected():
    raw = tiny_raw_params()
    raw["dedup"]["treshold"] = 0.8  # typo of threshold
    with pytest.raises(ConfigError, match=r"dedup\.treshold: unknown key"):
        parse_params(raw)


def test_bad_source_kind_and_weights_mismatch():
    raw = tiny_raw_params()
    raw["collect"]["sources"][0]["kind"] = "ftp"
    with pytest.raises(ConfigError, match="collect.sources.0"):
        parse_params(raw)
    raw = tiny_raw_params()
    raw["mix"]["weights"]["nope"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown \['nope'\]"):
        parse_params(raw)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_stage_cli_reports_bad_params_without_traceback(tmp_path):
    raw = tiny_raw_params()
    raw["dedup"]["num_perm"] = 3
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "tasks.dedup", "--params", str(p)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert "dedup.num_perm = 3" in res.stderr
    assert "Traceback" not in res.stderr
