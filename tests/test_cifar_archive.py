"""CIFAR-10/100 end to end without the real archives (they cannot be downloaded here): small
archives in torchvision's on-disk format are placed in a data root, and a short `mhpfl run`
with augmentation on goes through the loader, normalisation, partition (K=10 on CIFAR-100)
and augmentation. Also: damaged dataset files are reported as damaged, by path."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mhpfl.cli import main
from mhpfl.datasets.loaders import DATASETS, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = {  # dataset -> (archive, folder, [(file, number of samples)], label key, meta file)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [*[(f"data_batch_{i}", 60) for i in range(1, 6)], ("test_batch", 100)], "labels", "batches.meta"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", [("train", 1000), ("test", 400)],
                 "fine_labels", "meta"),
}


def write_archive(root, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A gzipped tar in torchvision's CIFAR layout (pickled dicts of uint8 rows, CHW order)
    with random images and balanced labels; returns what it holds."""
    archive, folder, files, key, meta = LAYOUT[name]
    classes = DATASETS[name].num_classes
    rng = np.random.default_rng(seed)
    held = {}
    with tarfile.open(root / archive, "w:gz") as tar:
        def add(fname, obj):
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        for fname, n in files:
            data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
            labels = rng.permutation(np.arange(n) % classes).tolist()
            add(fname, {"data": data, key: labels})
            held[fname] = (data, np.asarray(labels))
        add(meta, {"label_names" if name == "cifar10" else "fine_label_names": [f"c{i}" for i in range(classes)]})
    return held


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision pins the real archives' MD5 sums; our small ones differ. Only that check is
    relaxed (a file must still exist)."""
    import os

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name,clients", [("cifar10", 5), ("cifar100", 10)])
def test_cifar_archive_runs_end_to_end_with_augmentation(tmp_path, name, clients, no_md5, capsys):
    held = write_archive(tmp_path, name)
    out = tmp_path / "out"
    # --no-download: the placed archive is extracted by us (torchvision only extracts when
    # allowed to download); the paper's partition: K=2 (CIFAR-10), K=10 (CIFAR-100, N*K % 100 == 0)
    assert main(["run", "standalone", "--dataset", name, "--data-root", str(tmp_path), "--no-download",
                 "--clients", str(clients), "--rounds", "1", "--val-size", "100", "--public-size", "0",
                 "--batch-size", "16", "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    cfg = s["config"]
    assert cfg["partition"] == ("pathological:10" if name == "cifar100" else "pathological:2")
    assert cfg["augment"] is None and DATASETS[name].augment  # on by default for CIFAR
    assert s["rounds_run"] == 1 and 0 <= s["best_mean_acc"] <= 100 and s["train_flops"] > 0
    assert sum(s["client_train_samples"]) > 0.9 * (sum(len(d) for f, (d, _) in held.items()
                                                       if "test" not in f) - 100)

    # what the loader decoded: the archive's pixels (HWC from CHW rows), normalised per channel
    load_dataset.cache_clear()
    ds = load_dataset(name, str(tmp_path), download=False)
    train = [held[f] for f, _ in [x for x in LAYOUT[name][2] if "test" not in x[0]]]
    x = np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32)
    y = np.concatenate([lab for _, lab in train])
    info = DATASETS[name]
    expect = (torch.from_numpy(x).float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(
        info.std).view(1, 3, 1, 1)
    assert ds.train_x.shape == (len(y), 3, 32, 32) and torch.equal(ds.train_y, torch.from_numpy(y))
    torch.testing.assert_close(ds.train_x, expect)
    assert len(ds.test_y) == LAYOUT[name][2][-1][1]
    load_dataset.cache_clear()


def run_err(capsys, *args):
    code = main(["run", "standalone", "--rounds", "1", "--no-download", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "download=True" not in err  # torchvision's hint is wrong under --no-download
    return err


def test_damaged_dataset_files_are_called_damaged(tmp_path, capsys):
    load_dataset.cache_clear()
    # a CIFAR file that fails torchvision's checksum
    (tmp_path / "a" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "a" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    err = run_err(capsys, "--dataset", "cifar10", "--data-root", str(tmp_path / "a"))
    assert "corrupt" in err and str(tmp_path / "a" / "cifar-10-batches-py" / "data_batch_1") in err
    assert "not found" not in err
    # a damaged archive
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cifar-100-python.tar.gz").write_bytes(b"not a tarball")
    err = run_err(capsys, "--dataset", "cifar100", "--clients", "10", "--data-root", str(tmp_path / "b"))
    assert "corrupt" in err and str(tmp_path / "b" / "cifar-100-python.tar.gz") in err
    # truncated Fashion-MNIST IDX files
    raw = tmp_path / "c" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    err = run_err(capsys, "--data-root", str(tmp_path / "c"))
    assert "corrupt" in err and str(raw) in err and "not found" not in err
    # nothing there at all: not found, with what to place where
    err = run_err(capsys, "--dataset", "cifar10", "--data-root", str(tmp_path / "d"))
    assert "not found" in err and "cifar-10-python.tar.gz" in err
    load_dataset.cache_clear()


def test_a_failed_download_is_one_line_and_leaves_nothing_that_reads_as_data(tmp_path, monkeypatch):
    """torchvision's MNIST-family download fails (offline) with a RuntimeError listing every mirror's
    URL on several lines, after making ROOT/KMNIST/raw. The error is one line, and the empty folder
    it left is removed: a later --no-download says "not found", not "corrupt"."""
    import torchvision.datasets as tvd

    from mhpfl.datasets.loaders import _torchvision
    from mhpfl.errors import UserError

    def offline(self):
        (Path(self.raw_folder)).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz.part").write_bytes(b"x")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://a/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(tvd.KMNIST, "download", offline)
    with pytest.raises(UserError) as e:
        _torchvision("kmnist", tmp_path, download=True)
    msg = str(e.value)
    assert "\n" not in msg and "kmnist not found under" in msg and "download failed (RuntimeError)" in msg
    assert not (tmp_path / "KMNIST").exists()
    with pytest.raises(UserError, match="kmnist not found under .*place the four IDX files"):
        _torchvision("kmnist", tmp_path, download=False)
