"""FedMD on fair terms: the public pool's size, named public datasets, and the extra-data mark."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from mhpfl.config import RunConfig
from mhpfl.datasets import federate, PartitionSpec, public_pool_size
from mhpfl.engine import run
from mhpfl.errors import UserError
from mhpfl.methods import BUILTIN, get_method
from tests.conftest import needs_fmnist


def write_idx(raw, prefix: str, n: int, seed: int) -> None:
    """n images (28x28) and labels in the IDX format torchvision's MNIST-style loaders read."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


@pytest.fixture
def fmnist_root_with(tmp_path, data_root):
    """A data root with Fashion-MNIST (staged from Debian's package) and small MNIST / KMNIST."""
    import shutil
    from pathlib import Path

    from mhpfl.datasets.loaders import _stage_debian_fmnist

    _stage_debian_fmnist(Path(data_root))
    shutil.copytree(Path(data_root) / "FashionMNIST", tmp_path / "FashionMNIST")
    for i, folder in enumerate(("MNIST", "KMNIST")):
        write_idx(tmp_path / folder / "raw", "train", 600, seed=i)
        write_idx(tmp_path / folder / "raw", "t10k", 100, seed=10 + i)
    return str(tmp_path)


def test_public_pool_defaults_to_a_clients_mean_private_set_and_scales_with_the_fraction():
    assert public_pool_size(None, 60_000, 10_000, 1.0, 10) == 5_000
    assert public_pool_size(None, 60_000, 10_000, 0.1, 50) == 100  # 50,000 x 0.1 / 50
    assert public_pool_size(5_000, 60_000, 10_000, 0.1, 10) == 500  # an explicit size is scaled too


def test_only_fedmd_declares_extra_data():
    marked = {m for m in BUILTIN if get_method(m).extra_data}
    assert marked == {"fedmd"}


def test_a_public_dataset_of_another_shape_is_refused_before_loading():
    with pytest.raises(UserError, match="--public cifar10 .* does not fit fmnist"):
        RunConfig(method="fedmd", public="cifar10", download=False).validate()


@needs_fmnist
def test_a_missing_public_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError, match=r"mnist not found under .*place the four IDX files .*MNIST/raw"):
        federate("fmnist", 10, PartitionSpec.parse("pathological:2"), 0, data_root=str(tmp_path),
                 download=False, public="mnist")


@needs_fmnist
@pytest.mark.parametrize("public", ["mnist", "kmnist"])
def test_fmnist_clients_with_a_named_public_dataset(fmnist_root_with, public, one_thread):
    cfg = RunConfig(method="fedmd", dataset="fmnist", clients=5, rounds=1, train_fraction=0.05,
                    batch_size=32, public=public, data_root=fmnist_root_with, download=False,
                    method_options={"public_subset": 50, "transfer_public_epochs": 1, "transfer_private_epochs": 1})
    s = run(cfg, progress=False)
    expected = public_pool_size(None, 60_000, cfg.val_size, cfg.train_fraction, cfg.clients)
    assert s["public_size"] == expected == 500
    assert s["extra_data"] == "labelled public data"
    n_sub = min(50, expected)
    assert s["bytes_up"] == cfg.clients * n_sub * 10 * 4


@needs_fmnist
def test_heldout_public_pool_is_scaled_in_a_run(tiny_cfg, one_thread):
    s = run(tiny_cfg("fedmd", rounds=1, public_size=2_000,
                     method_options={"public_subset": 1000, "transfer_public_epochs": 0,
                                     "transfer_private_epochs": 0}), progress=False)
    assert s["public_size"] == 100  # 2,000 x --train-fraction 0.05
    assert s["bytes_up"] == 5 * 100 * 10 * 4  # the subset is capped at the scaled pool


def test_too_few_rounds_to_reach_every_client_is_refused():
    with pytest.raises(UserError, match="cannot give each of the 100 clients a participation"):
        RunConfig(method="standalone", clients=100, frac=0.1, rounds=9, download=False).validate()
