"""Real dataset loaders (torchvision), decoded once into in-memory tensors.

Images are kept as one normalised float32 tensor per split (N, C, H, W); batches are made by
indexing, never by per-sample PIL transforms. The decoded, normalised tensors are cached in the
data root (`.mhpfl-cache/NAME-vK.pt`, memory-mapped on load): a run's start-up then skips
torchvision's import and decoding (about 4 s on a loaded 2-core machine, 0.1 s cached).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mhpfl.errors import UserError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # the paper lineage's training augmentation applies by default
    archive: str  # what a user places in the data root when offline


DATASETS: dict[str, DatasetInfo] = {
    "fmnist": DatasetInfo("fmnist", 10, (1, 28, 28), (0.2860,), (0.3530,), False,
                          "FashionMNIST/raw/*-ubyte(.gz)"),
    # MNIST and KMNIST: Fashion-MNIST's natural public datasets (FedMD's --public); usable as private data too
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), False, "MNIST/raw/*-ubyte(.gz)"),
    "kmnist": DatasetInfo("kmnist", 10, (1, 28, 28), (0.1918,), (0.3483,), False, "KMNIST/raw/*-ubyte(.gz)"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), True, "cifar-10-python.tar.gz"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), True, "cifar-100-python.tar.gz"),
}


@dataclass
class TensorDataset:
    """A decoded dataset: normalised images and integer labels for train and test."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def default_data_root() -> Path:
    return Path(os.environ.get("MHPFL_DATA", Path.home() / ".cache" / "mhpfl"))


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _normalise(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    x = images_uint8.to(torch.float32).div_(255.0)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def _stage_debian_fmnist(root: Path) -> None:
    """Decompress Debian's dataset-fashion-mnist IDX files where torchvision looks for them."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in FMNIST_FILES):
        return
    if not all((DEBIAN_FMNIST / f"{f}.gz").exists() for f in FMNIST_FILES):
        return
    tmp = None
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for f in FMNIST_FILES:
            tmp = raw / f".{f}.{os.getpid()}.tmp"  # concurrent runs stage side by side
            with gzip.open(DEBIAN_FMNIST / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(raw / f)
            tmp = None
    except (OSError, EOFError) as e:
        if getattr(e, "errno", None) is None:  # gzip's BadGzipFile or a truncated file: the package's
            raise UserError(f"fmnist: a file of Debian's Fashion-MNIST in {DEBIAN_FMNIST} is damaged "
                            f"({type(e).__name__}: {e}); reinstall it: apt-get install --reinstall "
                            "dataset-fashion-mnist") from None
        # a read-only or full data root, or a file where a folder must go
        raise UserError(f"fmnist: cannot decompress Debian's Fashion-MNIST into {raw} "
                        f"({e.strerror or type(e).__name__}); pass a writable --data-root DIR") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _cifar_problem(cls, root: Path) -> str | None:
    """What is wrong with an extracted CIFAR folder: a missing or corrupt file (torchvision's
    checksums), or None if it looks complete."""
    from torchvision.datasets.utils import check_integrity

    folder = root / cls.base_folder
    for fname, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        f = folder / fname
        if not f.is_file():
            return f"{f} is missing"
        if not check_integrity(str(f), md5):
            return f"{f} is corrupt (checksum mismatch)"
    return None


def _torchvision(name: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    cls = {"fmnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "kmnist": tvd.KMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100}[name]
    info = DATASETS[name]
    idx = name in ("fmnist", "mnist", "kmnist")  # IDX files under ROOT/<class name>/raw
    raw = root / cls.__name__ / "raw"
    if not idx and not download and not (root / cls.base_folder).exists() and (root / cls.filename).is_file():
        # torchvision extracts a placed archive only when allowed to download; do it here
        from torchvision.datasets.utils import extract_archive

        try:
            extract_archive(str(root / cls.filename), str(root))
        except Exception as e:  # tarfile.ReadError, EOFError, zlib.error, OSError ...
            raise UserError(f"{name}: {root / cls.filename} is corrupt ({type(e).__name__}: {e}); replace it "
                            "with a fresh copy from https://www.cs.toronto.edu/~kriz/") from None
    if idx:  # an empty raw folder (left by an earlier failed download) holds no data
        present = raw.is_dir() and any(raw.iterdir())
    else:
        present = (root / cls.base_folder).is_dir()
    made = root / cls.__name__ if idx else root / cls.filename  # what a download would create
    made_now = not made.exists()
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except OSError as e:  # download failed (no network, refused, ...), or unreadable files
        cause = f"download failed ({type(e).__name__})" if download and not present else f"{type(e).__name__}: {e}"
    except Exception as e:  # torchvision: "Dataset not found or corrupted"; a parser error on a damaged file
        if download and not present and isinstance(e, RuntimeError) and "download" in str(e).lower():
            cause = f"download failed ({type(e).__name__})"  # torchvision's text lists every mirror's URL
        else:
            cause = (None if isinstance(e, RuntimeError) and "not found" in str(e)
                     else f"cannot be parsed: {type(e).__name__} {e}")
    if cause:
        cause = " ".join(cause.split())[:300]
    if download and not present and made_now:  # what a failed download left (folders, a partial file) is not data
        if made.is_dir():
            shutil.rmtree(made, ignore_errors=True)
        else:
            made.unlink(missing_ok=True)
    if present:
        if idx:
            what = next((f"{raw / f} is missing" for f in FMNIST_FILES if not (raw / f).is_file()), None)
        else:
            what = _cifar_problem(cls, root)
        where = raw if idx else root / cls.base_folder
        fresh = (("the four IDX files" + (" (or install dataset-fashion-mnist)" if name == "fmnist" else ""))
                 if idx else f"{info.archive} in {root}")
        raise UserError(f"{name}: the files in {where} are corrupt or incomplete "
                        f"({what or cause.rstrip(': ') or 'unreadable'}); delete {where} and place a fresh copy: {fresh}")
    if name == "fmnist":
        hint = (f"install Debian's package (apt-get install dataset-fashion-mnist) or place the "
                f"four IDX files in {root / 'FashionMNIST' / 'raw'}")
    elif name in ("mnist", "kmnist"):
        hint = f"place the four IDX files (train/t10k images and labels) in {root / info.archive.split('/')[0] / 'raw'}"
    else:
        hint = f"place {info.archive} (from https://www.cs.toronto.edu/~kriz/) in {root}"
    how = f" ({cause})" if cause and download else ""
    raise UserError(f"{name} not found under {root}{how}; {hint}, or pass --data-root DIR")


def dataset_present(name: str, root: str | None = None) -> bool:
    """Whether `name` can be loaded from `root` on this machine without downloading (the files
    torchvision reads, CIFAR's archive, or Debian's Fashion-MNIST package to stage from)."""
    info = dataset_info(name)
    root_p = Path(root) if root else default_data_root()
    if name == "fmnist":
        raw = root_p / "FashionMNIST" / "raw"
        return (all((raw / f).exists() for f in FMNIST_FILES)
                or all((DEBIAN_FMNIST / f"{f}.gz").exists() for f in FMNIST_FILES))
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    return (root_p / folder).is_dir() or (root_p / info.archive).is_file()


CACHE_VERSION = 1


def cache_path(root: Path, info: DatasetInfo) -> Path:
    """Where the decoded tensors of `info` are cached under `root` (keyed by the normalisation)."""
    key = hashlib.sha1(repr((CACHE_VERSION, info.name, info.in_shape, info.mean, info.std)).encode()).hexdigest()[:10]
    return root / ".mhpfl-cache" / f"{info.name}-{key}.pt"


def _read_cache(path: Path, info: DatasetInfo) -> TensorDataset | None:
    try:
        d = torch.load(path, weights_only=True, mmap=True)  # copy-on-write mapping: pages load lazily
        return TensorDataset(info, d["train_x"], d["train_y"], d["test_x"], d["test_y"])
    except Exception:  # absent, truncated or from another torch: decode again
        return None


CACHE_FREE_MARGIN = 1 << 30  # the cache is written only where this much would stay free after it


def _write_cache(path: Path, ds: TensorDataset) -> None:
    """Cache the decoded tensors, or skip it: the cache only saves decoding time, so a data root
    that is read-only, short of space (it would keep less than CACHE_FREE_MARGIN free) or fails
    mid-write (torch.save reports a full disk as RuntimeError) costs the decoding next time."""
    tensors = {"train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x, "test_y": ds.test_y}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need = sum(t.untyped_storage().nbytes() for t in tensors.values())
        if shutil.disk_usage(path.parent).free < need + CACHE_FREE_MARGIN:
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)
        torch.save(tensors, tmp)
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError):
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, root: str | None = None, download: bool = True) -> TensorDataset:
    """Decode a dataset once into normalised CPU tensors, cached in the data root."""
    info = dataset_info(name)
    root_p = Path(root) if root else default_data_root()
    try:
        root_p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data root {root_p} ({e.strerror}); pass --data-root DIR") from None
    cached = _read_cache(cache_path(root_p, info), info)
    if cached is not None:
        return cached
    ds = _decode(name, info, root_p, download)
    _write_cache(cache_path(root_p, info), ds)
    return ds


def _decode(name: str, info: DatasetInfo, root_p: Path, download: bool) -> TensorDataset:
    if name == "fmnist":
        _stage_debian_fmnist(root_p)
    train, test = _torchvision(name, root_p, download)

    def images(ds) -> torch.Tensor:
        data = ds.data
        if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C) uint8
            return torch.from_numpy(data).permute(0, 3, 1, 2)
        return data.unsqueeze(1)  # MNIST-style: (N, H, W) uint8

    def labels(ds) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    return TensorDataset(info, _normalise(images(train), info), labels(train),
                         _normalise(images(test), info), labels(test))
