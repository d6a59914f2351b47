"""Run configuration: every setting of a run, validated before any work starts."""
from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from mhpfl.errors import UserError

PRECISIONS = ("fp32", "bf16")
TEST_EVALS = ("every", "improved")
PAPER_K = {"fmnist": 2, "mnist": 2, "kmnist": 2, "cifar10": 2, "cifar100": 10}


@dataclass
class RunConfig:
    method: str
    dataset: str = "fmnist"
    clients: int = 10
    frac: float = 1.0
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 50.0
    partition: str = ""  # default: pathological:K with the paper's K for the dataset
    zoo: str = "hetero"
    train_fraction: float = 1.0
    val_size: int = 10_000
    public_size: int | None = None  # default: a client's mean private set; scaled by train_fraction
    public: str = "heldout"  # public pool: a held-out slice of the training pool, or a dataset name
    augment: bool | None = None  # default: the dataset's (on for CIFAR, off for Fashion-MNIST)
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast of forward passes; fp32 weights and optimizer)
    batch_clients: bool = False  # train clients of one architecture as one vmapped computation
    eval_every: int = 1
    # every: the test split at every evaluated round (test curves, the paper's best-on-test view);
    # improved: only where the mean validation accuracy improves, and at the last round (exact
    # selected and final accuracies, no best-on-test view; engine/runner.py)
    test_eval: str = "every"
    data_root: str | None = None
    download: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.partition and self.dataset in PAPER_K:
            self.partition = f"pathological:{PAPER_K[self.dataset]}"

    @property
    def per_round(self) -> int:
        """Participants per round: round(frac x clients), at least one (frac must be in (0, 1])."""
        return max(1, int(round(self.frac * self.clients)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise UserError(f"unknown run setting(s) {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def validate(self) -> None:
        """Raise UserError on any impossible setting (cheap checks, before data is loaded)."""
        from mhpfl.datasets import PartitionSpec, dataset_info
        from mhpfl.methods import get_method
        from mhpfl.models import ZOOS

        cls = get_method(self.method)
        info = dataset_info(self.dataset)
        if self.public != "heldout":
            from mhpfl.datasets import check_public_pair

            check_public_pair(self.public, info)  # unknown names and other input shapes fail here
        checks = [
            (self.clients >= 1, f"--clients must be >= 1 (got {self.clients})"),
            (0 < self.frac <= 1, f"--frac must be in (0, 1] (got {self.frac})"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (self.local_epochs >= 1, f"--local-epochs must be >= 1 (got {self.local_epochs})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite number > 0 (got {self.lr})"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0 (got {self.weight_decay})"),
            (math.isfinite(self.grad_clip) and self.grad_clip >= 0,
             f"--grad-clip must be a finite number >= 0, 0 turning clipping off (got {self.grad_clip})"),
            (0 < self.train_fraction <= 1, f"--train-fraction must be in (0, 1] (got {self.train_fraction})"),
            (self.seed >= 0, f"--seed must be >= 0 (got {self.seed})"),
            (self.eval_every >= 1, f"--eval-every must be >= 1 (got {self.eval_every})"),
            (self.val_size >= 0, f"--val-size must be >= 0 (got {self.val_size})"),
            (self.public_size is None or self.public_size >= 0,
             f"--public-size must be >= 0 (got {self.public_size})"),
            (self.public != "heldout" or self.public_size is None
             or round(self.public_size * self.train_fraction) <= self.val_size,
             f"--public-size ({self.public_size}) x --train-fraction must not exceed --val-size "
             f"({self.val_size}) when the public pool is held out of the training pool"),
            (not 0 < self.frac <= 1 or self.rounds * self.per_round >= self.clients,
             f"--rounds {self.rounds} x {self.per_round if 0 < self.frac <= 1 else '?'} participants per "
             f"round cannot give each of the {self.clients} clients a participation; raise --rounds or --frac"),
            (self.zoo in ZOOS, f"unknown zoo '{self.zoo}'; choose one of {', '.join(ZOOS)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        if self.zoo not in cls.zoos:
            raise UserError(f"{self.method} supports only --zoo {' or '.join(cls.zoos)}; "
                            f"it cannot run on the '{self.zoo}' zoo")
        spec = PartitionSpec.parse(self.partition)
        if spec.kind == "pathological":
            k, n, c = spec.k, self.clients, info.num_classes
            if not 1 <= k <= c:
                raise UserError(f"pathological:{k} needs 1 <= K <= {c} (classes in {self.dataset})")
            if (n * k) % c:
                raise UserError(f"pathological:{k} with {n} clients cannot share {c} classes evenly: "
                                f"choose --clients N with N*{k} divisible by {c}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {self.device} asked for, but no CUDA GPU is available; "
                                "use --device cpu")
        elif self.device != "cpu":
            raise UserError(f"unknown device '{self.device}'; use cpu or cuda")
        if self.test_eval not in TEST_EVALS:
            raise UserError(f"unknown --test-eval '{self.test_eval}'; use {' or '.join(TEST_EVALS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}'; use {' or '.join(PRECISIONS)}")
        cls(**self.method_options).validate(self, info)  # unknown or impossible method options fail here


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mhpfl-bench", "torch", "torchvision", "peft", "fvcore", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
