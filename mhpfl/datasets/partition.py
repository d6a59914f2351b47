"""Federated partitions, deterministic from the seed.

A partition is a share matrix S (clients x classes): S[i, c] is the fraction of class c's
samples that client i receives; each column sums to 1 over the clients that hold the class.
The same S is applied to the training, validation and test pools, so every client is tested on
its own label distribution (personalized evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mhpfl.errors import UserError
from mhpfl.seeding import np_rng

MIN_DIRICHLET_SAMPLES = 10


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "pathological" | "dirichlet"
    k: int = 0  # classes per client (pathological)
    alpha: float = 0.0  # concentration (dirichlet)

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        kind, _, arg = text.partition(":")
        try:
            if kind == "pathological":
                return cls(kind, k=int(arg))
            if kind == "dirichlet":
                alpha = float(arg)
                if not 0 < alpha < float("inf"):
                    raise ValueError
                return cls(kind, alpha=alpha)
        except ValueError:
            pass
        raise UserError(f"bad partition '{text}'; use pathological:K (e.g. pathological:2) "
                        "or dirichlet:ALPHA (e.g. dirichlet:0.3)")

    def __str__(self) -> str:
        return f"pathological:{self.k}" if self.kind == "pathological" else f"dirichlet:{self.alpha:g}"


def pathological_shares(num_clients: int, num_classes: int, k: int, rng: np.random.Generator,
                        low: float = 0.4, high: float = 0.6) -> np.ndarray:
    """pFedHN's scheme: each client holds k distinct classes, each class is shared by
    N*k/num_classes clients, and a client's share of a class is U(low, high) normalised over the
    clients sharing it."""
    if not 1 <= k <= num_classes:
        raise UserError(f"pathological:{k} needs 1 <= K <= {num_classes} (the number of classes)")
    if (num_clients * k) % num_classes:
        raise UserError(f"pathological:{k} with {num_clients} clients cannot share {num_classes} "
                        f"classes evenly: choose N and K with N*K divisible by {num_classes}")
    per_class = num_clients * k // num_classes
    remaining = np.full(num_classes, per_class)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        chosen: list[int] = []
        for _ in range(k):
            # Take among the classes with the most unfilled slots (ties at random) so that every
            # class ends up with exactly per_class holders and no client repeats a class.
            free = [c for c in range(num_classes) if c not in chosen and remaining[c] > 0]
            top = max(remaining[c] for c in free)
            c = int(rng.choice([c for c in free if remaining[c] == top]))
            chosen.append(c)
            remaining[c] -= 1
            holders[c].append(client)
    shares = np.zeros((num_clients, num_classes))
    for c, hs in enumerate(holders):
        w = rng.uniform(low, high, size=len(hs))
        shares[hs, c] = w / w.sum()
    return shares


def dirichlet_shares(num_clients: int, num_classes: int, alpha: float,
                     rng: np.random.Generator) -> np.ndarray:
    return rng.dirichlet(np.full(num_clients, alpha), size=num_classes).T


def apply_shares(labels: np.ndarray, pool: np.ndarray, shares: np.ndarray,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Split `pool` (indices with labels[pool]) into one index array per client by `shares`.

    For each class, the pool's samples are shuffled and handed out in consecutive chunks of
    floor(n_c * S[i, c]); no sample is given twice.
    """
    num_clients, num_classes = shares.shape
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    pool_labels = labels[pool]
    for c in range(num_classes):
        idx = pool[pool_labels == c]
        idx = idx[rng.permutation(len(idx))]
        counts = np.floor(len(idx) * shares[:, c]).astype(int)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for i in np.flatnonzero(counts):
            parts[i].append(idx[starts[i]:starts[i] + counts[i]])
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def classes_present(labels: np.ndarray) -> np.ndarray:
    """The class ids among `labels`, ascending (np.unique's result; np.unique imports numpy.ma,
    0.02 s of a run's start-up)."""
    return np.flatnonzero(np.bincount(labels))


def subsample(labels: np.ndarray, idx: np.ndarray, fraction: float,
              rng: np.random.Generator) -> np.ndarray:
    """Keep a seeded fraction of idx per class (at least one sample of every class held)."""
    if fraction >= 1.0 or len(idx) == 0:
        return idx
    kept = []
    for c in classes_present(labels[idx]):
        ic = idx[labels[idx] == c]
        n = max(1, int(round(fraction * len(ic))))
        kept.append(rng.choice(ic, size=n, replace=False))
    return np.sort(np.concatenate(kept))


def public_pool_size(public_size: int | None, n_train: int, val_size: int, train_fraction: float,
                     num_clients: int) -> int:
    """Size of the labelled public pool (FedMD's): --public-size scaled by --train-fraction (the
    pool shrinks with the data actually used), or by default the mean private training set of a
    client, so that public data never outweighs what a client owns."""
    if public_size is None:
        return int((n_train - val_size) * train_fraction) // num_clients
    return int(round(public_size * train_fraction))


@dataclass
class ClientIndices:
    train: np.ndarray  # into the training tensors
    val: np.ndarray  # into the training tensors (held-out pool)
    test: np.ndarray  # into the test tensors
    classes: list[int]


@dataclass
class Partition:
    clients: list[ClientIndices]
    public: np.ndarray  # into the training tensors; owned by no client
    shares: np.ndarray


def make_partition(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int,
                   num_clients: int, spec: PartitionSpec, seed: int, *, val_size: int = 0,
                   public_size: int = 0, train_fraction: float = 1.0) -> Partition:
    """Hold out `val_size` training samples (the first `public_size` of them form the public
    pool, the rest are split over clients as validation sets), then split the remaining
    training pool and the test set over clients with one share matrix."""
    n = len(train_labels)
    if public_size > val_size:
        raise UserError(f"the public pool ({public_size} samples: --public-size, by default a client's mean "
                        f"private set) does not fit in the held-out pool (--val-size {val_size}); raise "
                        "--val-size, or lower --public-size (0 where no method uses public data; FedMD does)")
    if val_size >= n:
        raise UserError(f"--val-size {val_size} leaves no training data ({n} samples)")
    if num_clients > min(n - val_size, len(test_labels)):
        raise UserError(f"{num_clients} clients cannot each hold a training and a test sample: the training "
                        f"pool has {n - val_size} and the test set {len(test_labels)}; use fewer --clients")
    order = np_rng(seed, "holdout").permutation(n)
    public, val_pool, train_pool = order[:public_size], order[public_size:val_size], order[val_size:]

    if spec.kind == "pathological":
        shares = pathological_shares(num_clients, num_classes, spec.k, np_rng(seed, "shares"))
    else:
        for attempt in range(100):
            shares = dirichlet_shares(num_clients, num_classes, spec.alpha, np_rng(seed, "shares", attempt))
            counts = [len(p) for p in apply_shares(train_labels, train_pool, shares, np_rng(seed, "train"))]
            if min(counts) >= MIN_DIRICHLET_SAMPLES:
                break
        else:
            raise UserError(f"{spec} leaves a client with fewer than {MIN_DIRICHLET_SAMPLES} "
                            "training samples in 100 draws; raise ALPHA or lower --clients")

    train = apply_shares(train_labels, train_pool, shares, np_rng(seed, "train"))
    val = apply_shares(train_labels, val_pool, shares, np_rng(seed, "val"))
    test = apply_shares(test_labels, np.arange(len(test_labels)), shares, np_rng(seed, "test"))
    clients = []
    for i in range(num_clients):
        tr = subsample(train_labels, train[i], train_fraction, np_rng(seed, "fraction", i))
        if len(tr) == 0 or len(test[i]) == 0:
            raise UserError(f"client {i} got no training or test data with {spec} and "
                            f"{num_clients} clients; use fewer clients or another partition")
        clients.append(ClientIndices(tr, val[i], test[i], classes_present(train_labels[tr]).tolist()))
    return Partition(clients, np.sort(public), shares)
