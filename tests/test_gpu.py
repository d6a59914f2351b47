"""The GPU path (`--device cuda`), checked on a GPU. Skipped where CUDA is absent (CI, this
project's CPU machines); `benchmarks/gpu_check.sh` runs this file first on a GPU machine.

What the CPU tests can only stand in for, measured here on the device itself:
- no training step of any method waits for the host: CUDA's sync debug mode raises on every
  synchronising call (`.item()`, a device-to-host copy, `nonzero`, ...) made inside a step
  (forward, backward, clipping, the SGD step, the batched engine's vmapped step), one client at
  a time and batched (tests/test_speed.py counts the same ops on CPU with a dispatch mode);
- every client's data, models and random stream live on the device;
- seeded runs on the device are identical (deterministic algorithms, cuBLAS's workspace);
- batched and one-at-a-time training give the same parameters, bytes and FLOPs there;
- every method runs under `--precision bf16`, and a non-finite loss stops with the usual error.

`MHPFL_GPU_TEST_DEVICE=cpu` runs the same tests on CPU, to check the tests themselves (CUDA's
sync debug mode then checks nothing). Where Fashion-MNIST is absent (a bare GPU machine), a
Fashion-MNIST-shaped random stand-in is written: none of these checks depends on pixel values.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from mhpfl.config import RunConfig
from tests.conftest import HAVE_FMNIST, strip_timing
from tests._engine_util import EVERY_METHOD, SHORT, assert_same, float32_tol, play

DEVICE = os.environ.get("MHPFL_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device here (MHPFL_GPU_TEST_DEVICE=cpu runs these on CPU)")


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_root) -> str:
    if HAVE_FMNIST:
        return data_root
    from benchmarks.paper_cost import stand_in_fmnist

    path = tmp_path_factory.mktemp("fmnist-stand-in")
    stand_in_fmnist(path)
    return str(path)


@pytest.fixture
def cfg(root):
    def make(method: str, **kw) -> RunConfig:
        base = dict(method=method, dataset="fmnist", clients=5, frac=1.0, rounds=2, val_size=500,
                    train_fraction=0.02, batch_size=32, seed=0, data_root=root, download=False, device=DEVICE,
                    zoo="homo" if method == "fedavg" else "hetero", method_options=SHORT.get(method, {}))
        base.update(kw)
        return RunConfig(**base)

    return make


@contextmanager
def no_sync():
    """Every synchronising CUDA call inside raises (a no-op off CUDA)."""
    if DEVICE != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def test_the_sync_check_catches_a_host_read():
    """The check below can fail: a value read by the host inside `no_sync` raises."""
    if DEVICE != "cuda":
        pytest.skip("CUDA's sync debug mode exists on CUDA only")
    t = torch.ones(3, device=DEVICE)
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_sync():
            float(t.sum())
    with no_sync():
        t.mul_(2)  # queued work alone is fine


@pytest.mark.parametrize("batch_clients", [False, True], ids=["one-at-a-time", "batched"])
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_no_training_step_waits_for_the_host(method, batch_clients, cfg, tmp_path, monkeypatch):
    from mhpfl.engine import batching, context, run

    steps = []

    def checked(fn):
        def inner(*a, **kw):
            steps.append(fn.__qualname__)
            with no_sync():
                return fn(*a, **kw)
        return inner

    for cls, name in ((context.FitRun, "backward"), (context.FitRun, "update"), (batching._Together, "step")):
        monkeypatch.setattr(cls, name, checked(getattr(cls, name)))
    # FD: with 5 clients of 2 labels, a label's only holder is the client itself; count its logits
    options = {**SHORT.get(method, {}), **({"exclude_own": False} if method == "fd" else {})}
    run(cfg(method, batch_clients=batch_clients, method_options=options,
            zoo="homo" if method == "fedavg" or batch_clients else "hetero"), out=tmp_path, progress=False)
    assert len(steps) > 20
    # off the CPU every method's loss batches (FD weights its term by the mask: no branch on data;
    # on CPU it branches once it has targets, and runs one client at a time from then on)
    assert ("_Together.step" in steps) == batch_clients or (method, DEVICE) == ("fd", "cpu")


def test_data_models_and_streams_live_on_the_device(cfg):
    from mhpfl.engine.runner import Federation

    fed = Federation.build(cfg("fedmd"))  # FedMD: a public pool too
    for c in fed.clients:
        for s in (c.data.train, c.data.val, c.data.test, c.public):
            assert s.x.device.type == DEVICE and s.y.device.type == DEVICE
        assert all(p.device.type == DEVICE for m in c.modules for p in m.parameters())
        assert c.gen.device.type == DEVICE


@pytest.mark.parametrize("method", ["standalone", "pfedlora", "fedproto", "fd"])
def test_seeded_runs_on_the_device_are_identical(method, cfg, tmp_path):
    from mhpfl.engine import run

    a = run(cfg(method, rounds=3), out=tmp_path / "a", progress=False)
    b = run(cfg(method, rounds=3), out=tmp_path / "b", progress=False)
    assert strip_timing(a) == strip_timing(b)
    # fp32 is fp32 there: no TF32 convolutions (PyTorch's cuDNN default) or matmuls
    assert DEVICE != "cuda" or not (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_batched_round_equals_one_at_a_time_on_the_device(method, cfg):
    kw = dict(zoo="homo", rounds=1)
    alone = play(cfg(method, **kw), 1)
    together = play(cfg(method, batch_clients=True, **kw), 1)
    assert together[3] > 0 or (method == "fd" and DEVICE == "cpu")  # on CPU FD branches on data
    assert_same(alone[0], together[0], float32_tol(method))
    assert together[1:3] == alone[1:3]


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_runs_in_bf16_on_the_device(method, cfg, tmp_path):
    from mhpfl.engine import run

    s = run(cfg(method, precision="bf16", rounds=1), out=tmp_path, progress=False)
    assert s["config"]["precision"] == "bf16"
    assert 0 <= s["final_mean_acc"] <= 100


def test_a_non_finite_loss_on_the_device_stops_with_the_usual_error(cfg, tmp_path):
    from mhpfl.engine import run
    from mhpfl.errors import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"standalone: loss became (nan|inf) on client 0 in round 1; lower --lr"):
        run(cfg("standalone", lr=1e12, grad_clip=0.0), out=tmp_path, progress=False)
