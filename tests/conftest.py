"""Shared test fixtures. Tests never download: datasets come from the Debian package
`dataset-fashion-mnist` or are built in memory."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from mhpfl.config import RunConfig
from mhpfl.datasets.loaders import DEBIAN_FMNIST

HAVE_FMNIST = (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists() or bool(os.environ.get("MHPFL_DATA"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="module")
def sigterm_handler_restored():
    """ray.init (the Ray executor's tests, Flower's simulation) installs a SIGTERM handler that
    raises SystemExit, which pytest reports as one test's failure and then goes on: the handler of
    before is put back after each module, so a SIGTERM (CI's time limit, a kill) stops the session."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture
def one_thread():
    """One torch thread for the test (bench runs in worker processes would oversubscribe)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """One data root for the session (Debian's Fashion-MNIST is staged into it)."""
    return os.environ.get("MHPFL_DATA") or str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_cfg(data_root):
    """A small, fast real-data configuration: 5 clients, 2 rounds, 5% of the training data,
    2,000 held-out samples (validation splits and the public pool)."""

    def make(method: str, **kw) -> RunConfig:
        base = dict(method=method, dataset="fmnist", clients=5, frac=1.0, rounds=2, val_size=2000,
                    train_fraction=0.05, batch_size=32, seed=0, data_root=data_root, download=False)
        base.update(kw)
        return RunConfig(**base)

    return make


def strip_timing(summary: dict) -> dict:
    from mhpfl.engine import TIMING_FIELDS

    return {k: v for k, v in summary.items() if k not in TIMING_FIELDS}


def synthetic_client(method: str, cid: int = 1, arch: str = "cnn3", labels=(2, 7), n: int = 12):
    """A client with random Fashion-MNIST-shaped inputs and the given label pattern repeated
    (train = val = test = public), for unit tests of a method's local step."""
    from mhpfl.datasets import ClientData, Split, dataset_info
    from mhpfl.engine import Client, FlopMeter

    info = dataset_info("fmnist")
    g = torch.Generator().manual_seed(cid)
    y = torch.tensor(labels).repeat(n // len(labels))
    split = Split(torch.randn(len(y), *info.in_shape, generator=g), y)
    return Client(cid, arch, ClientData(split, split, split, sorted(set(labels))), split, info,
                  RunConfig(method=method, download=False), FlopMeter(), method)


def synthetic_server(method: str):
    from mhpfl.datasets import dataset_info
    from mhpfl.engine import Server

    s = Server(RunConfig(method=method, download=False), dataset_info("fmnist"), 0)
    s.start_round(1)
    return s


def one_pass_fit(client, record):
    """Stand-in for client.fit: one loss evaluation over all the data, no step."""
    def fit(params, loss_fn, **kw):
        loss = loss_fn(client.data.train.x, client.data.train.y)
        record.append(loss.detach())
        return float(loss.detach())
    return fit


def fit_flops(model, n: int, batch: int, epochs: int = 1) -> int:
    """Independent count of what `client.fit` charges for training all of `model` on n samples
    (FlopCounterMode on a copy: forward + the backward autograd runs, multiply-add = 1 FLOP)."""
    import copy

    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    def step(b: int) -> int:
        m = copy.deepcopy(model)
        p = next(m.parameters())
        x = torch.zeros(b, *_in_shape(m), device=p.device)
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(m(x), torch.zeros(b, dtype=torch.long)).backward()
        return fc.get_total_flops() // 2

    full, rest = divmod(n, batch)
    return epochs * (full * (step(batch) if full else 0) + (step(rest) if rest else 0))


def _in_shape(model):
    conv1 = model.conv1
    return (conv1.in_channels, 28, 28) if conv1.in_channels == 1 else (conv1.in_channels, 32, 32)


def sigterm_cli(args: list[str], ready, before_signal=None) -> tuple[int, list[str], object]:
    """Start `mhpfl ARGS`, wait (up to 120 s) until `ready()`, call `before_signal(pid)`, send
    SIGTERM, and return (exit status, stderr's lines, what before_signal returned). Asserts that
    stderr holds no traceback."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "mhpfl.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        assert ready(), "the command never reached the point to interrupt"
        seen = before_signal(p.pid) if before_signal else None
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "Traceback" not in stderr, stderr
    return p.returncode, stderr.strip().splitlines(), seen
