"""Shared test fixtures. Tests never download: datasets come from the Debian package
`dataset-fashion-mnist` or are built in memory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mhpfl.config import RunConfig
from mhpfl.datasets.loaders import DEBIAN_FMNIST

HAVE_FMNIST = (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists() or bool(os.environ.get("MHPFL_DATA"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """One data root for the session (Debian's Fashion-MNIST is staged into it)."""
    return os.environ.get("MHPFL_DATA") or str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_cfg(data_root):
    """A small, fast real-data configuration: 5 clients, 2 rounds, 5% of the training data."""

    def make(method: str, **kw) -> RunConfig:
        base = dict(method=method, dataset="fmnist", clients=5, frac=1.0, rounds=2,
                    train_fraction=0.05, batch_size=32, seed=0, data_root=data_root, download=False)
        base.update(kw)
        return RunConfig(**base)

    return make


def strip_timing(summary: dict) -> dict:
    from mhpfl.engine import TIMING_FIELDS

    return {k: v for k, v in summary.items() if k not in TIMING_FIELDS}
