"""The GPU profile is consistent (its values agree with each other, checked relation by
relation, independently of the checker), the default params too, and a profile that
contradicts itself is refused naming the setting. Statistics over token files keep memory
flat at any size (a generated token file of 200M tokens, peak RSS measured in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


def merged(profile: str | None):
    from tasks.config import parse_params
    from tasks.profile import merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if profile:
        raw = merge(raw, yaml.safe_load((REPO / profile).read_text()))
    return parse_params(raw)


@pytest.mark.parametrize("profile", [None, "profiles/gpu.yaml"])
def test_the_profiles_values_agree_with_each_other(profile):
    from tasks.config import consistency_problems

    p = merged(profile)
    assert consistency_problems(p) == []
    # the same relations, written out here
    lengths = {p.preferences.sampling.max_new_tokens, p.ppo.sampling.max_new_tokens, p.group_rl.sampling.max_new_tokens,
               p.evaluate.sampling.max_new_tokens, p.dpo.kl_max_new_tokens}
    assert len(lengths) == 1 and p.instructions.max_response_tokens >= lengths.pop()
    train_prompts = p.preferences.prompts * (1 - p.preferences.val_fraction - p.preferences.test_fraction)
    rm_epochs = p.reward.train.steps * p.reward.train.batch_size * p.reward.train.grad_accum / train_prompts
    assert 0.5 <= rm_epochs <= 3.0, rm_epochs
    for sec, k in ((p.ppo, 1), (p.group_rl, p.group_rl.group_size)):
        assert sec.kl.horizon >= 4 * sec.batch_prompts * k  # beta moves at most 5% per iteration
    if profile:
        assert p.model.max_seq_len >= p.instructions.max_prompt_tokens + p.instructions.max_response_tokens
        assert p.pretrain.seq_len <= p.model.max_seq_len and p.pretrain.compute.device == "cuda"
        assert 0.8 <= rm_epochs <= 1.5  # InstructGPT: about one epoch
        assert p.ppo.batch_prompts == p.group_rl.batch_prompts * p.group_rl.group_size  # the same samples per iteration


@pytest.mark.parametrize("change, named", [
    ({"evaluate": {"sampling": {"max_new_tokens": 48}}}, "evaluate.sampling.max_new_tokens = 48"),
    ({"reward": {"train": {"steps": 1000}}}, "reward.train.steps = 1000"),
    ({"ppo": {"kl": {"horizon": 64}}}, "ppo.kl.horizon = 64"),
    ({"instructions": {"max_response_tokens": 64}}, "instructions.max_response_tokens = 64"),
    ({"modell": {"n_layer": 2}}, "modell: not a key of params.yaml"),
])
def test_a_profile_that_contradicts_itself_is_refused(change, named, tmp_path):
    from tasks.profile import merge

    profile = yaml.safe_load((REPO / "profiles/gpu.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(merge(profile, change) if "modell" not in change else {**profile, **change}))
    res = subprocess.run([sys.executable, "-m", "tasks.profile", str(bad), "--flags"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and named in res.stderr and res.stdout == "" and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_the_profile_becomes_dvc_flags_that_dvc_takes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tasks.profile", "profiles/gpu.yaml", "--flags"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    flags = res.stdout.split()
    pairs = dict(f.split("=", 1) for f in flags if f != "-S")
    assert flags.count("-S") == len(pairs) and pairs["model.d_model"] == "768" and pairs["ppo.kl.horizon"] == "512"
    from tasks.profile import leaves

    assert len(pairs) == len(leaves(yaml.safe_load((REPO / "profiles/gpu.yaml").read_text())))


MEMORY = """
import resource, sys, numpy as np
sys.path.insert(0, sys.argv[1])
from tasks.lib.tokens import max_token, unigram_entropy
data = np.memmap(sys.argv[2], dtype=np.uint16, mode="r")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
h = unigram_entropy(data, 50304)
top = max_token(data)
print(h, top, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.slow
def test_token_statistics_keep_memory_flat_at_200m_tokens(tmp_path):
    """200M tokens (400 MB of uint16): casting them to int64 at once took 1.6 GB; chunked,
    the statistics add well under 100 MB to the process (and give the known answer)."""
    import numpy as np

    path = tmp_path / "train.bin"
    n, chunk = 200_000_000, 10_000_000
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        for i in range(0, n, chunk):
            rng.integers(0, 1000, chunk, dtype=np.uint16).tofile(fh)
    res = subprocess.run([sys.executable, "-c", MEMORY, str(REPO), str(path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-1500:]
    entropy, top, grew_mb = res.stdout.split()
    assert abs(float(entropy) - np.log(1000)) < 1e-3 and int(top) == 999  # uniform over 1000 ids
    assert int(grew_mb) < 100, f"the statistics grew the process by {grew_mb} MB"
