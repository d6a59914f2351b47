"""Round-time benchmark (pytest-benchmark; disabled by default, run: make bench-time)."""
import pytest

from mhpfl.engine import run
from tests.conftest import needs_fmnist


@needs_fmnist
@pytest.mark.parametrize("method", ["standalone", "pfedlora"])
def test_round_time(benchmark, tiny_cfg, method):
    cfg = tiny_cfg(method, clients=10, rounds=1, train_fraction=0.1)
    summary = benchmark.pedantic(run, args=(cfg,), kwargs={"progress": False}, rounds=1, iterations=1)
    assert summary["rounds_run"] == 1
