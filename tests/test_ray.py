"""The Ray executor: the same stage functions on a local Ray instance, and on a cluster of
two Ray nodes started on this machine, give byte-identical outputs to the local pool."""

import hashlib
from pathlib import Path

import pytest

from tasks import collect, dedup, mix, quality, sources, tokenize, tokenizer
from tests.conftest import run_stage

pytestmark = pytest.mark.slow
DATA_HALF = (sources, collect, quality, dedup, mix, tokenizer, tokenize)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def with_executor(params, **kw):
    return params.model_copy(update={"executor": params.executor.model_copy(update=kw)})


def run_half(params, where: Path, monkeypatch) -> dict[str, str]:
    where.mkdir()
    monkeypatch.chdir(where)
    for stage in DATA_HALF:
        run_stage(stage, params)
    return {**digest(where / "data"), **digest(where / "models")}


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def test_ray_executor_gives_the_local_outputs(tmp_path, monkeypatch, tiny_params, ray_shutdown):
    local = run_half(with_executor(tiny_params, kind="local", workers=2), tmp_path / "local", monkeypatch)
    on_ray = run_half(with_executor(tiny_params, kind="ray", workers=2, ray_address=None), tmp_path / "ray", monkeypatch)
    assert on_ray == local and any(k.endswith("train.bin") for k in local)


def test_two_ray_nodes_on_this_machine(tmp_path, monkeypatch, tiny_params, ray_shutdown):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        params = with_executor(tiny_params, kind="ray", workers=0, ray_address=cluster.address)
        monkeypatch.chdir(tmp_path)
        for stage in (sources, collect, quality):
            run_stage(stage, with_executor(tiny_params, kind="local", workers=1))
        m_ray = run_stage(dedup, params)
        dedup_ray = digest(tmp_path / "data/dedup")
        m_local = run_stage(dedup, with_executor(tiny_params, kind="local", workers=1))
        assert digest(tmp_path / "data/dedup") == dedup_ray and m_ray == m_local
    finally:
        ray.shutdown()
        cluster.shutdown()
