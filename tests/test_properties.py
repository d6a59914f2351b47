"""Property-based tests (hypothesis) of the invariants users rely on: partitions, validation,
byte counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mhpfl.config import RunConfig
from mhpfl.datasets.partition import PartitionSpec, make_partition
from mhpfl.errors import UserError
from mhpfl.messages import message_bytes
from mhpfl.seeding import np_rng

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def labels(n_per_class: int, classes: int, seed: int) -> np.ndarray:
    return np_rng(seed, "labels").permutation(np.repeat(np.arange(classes), n_per_class))


@st.composite
def pathological(draw):
    c = draw(st.sampled_from([10, 100]))
    k = draw(st.integers(1, min(c, 12)))
    step = c // math.gcd(c, k)  # N*K divisible by C  <=>  N a multiple of C / gcd(C, K)
    n = step * draw(st.integers(1, max(1, 60 // step)))
    assume(n * k // c <= 12)  # holders per class: enough samples each
    return n, k, c, draw(st.integers(0, 2**31 - 1))


@FAST
@given(pathological(), st.integers(0, 60))
def test_pathological_partition_invariants(nkcs, val):
    """Any valid (N, K, seed): every training sample goes to at most one client, and only the
    per-class rounding remainder (fewer than the class's holders, pFedHN's int() truncation)
    to none; held-out samples to no client's training set; every client holds exactly K
    classes, every class N*K/C clients."""
    n, k, c, seed = nkcs
    tr, te = labels(80, c, seed), labels(40, c, seed + 1)
    val = min(val, len(tr) // 4)
    p = make_partition(tr, te, c, n, PartitionSpec("pathological", k=k), seed, val_size=val,
                       public_size=val // 2)
    train = np.concatenate([cl.train for cl in p.clients])
    assert len(train) == len(np.unique(train))  # nobody gets a sample twice
    held = np.concatenate([p.public, *[cl.val for cl in p.clients]])
    assert not np.intersect1d(train, held).size
    pool = np.setdiff1d(np.arange(len(tr)), np_rng(seed, "holdout").permutation(len(tr))[:val])
    unassigned = np.setdiff1d(pool, train)
    holders = n * k // c
    for cls in range(c):
        assert (tr[unassigned] == cls).sum() < holders  # only the rounding remainder
    assert all(len(cl.classes) == k for cl in p.clients)
    owners = np.zeros(c, int)
    for cl in p.clients:
        owners[cl.classes] += 1
        assert set(tr[cl.train]) == set(cl.classes) and set(te[cl.test]) <= set(cl.classes)
    assert (owners == holders).all()


@FAST
@given(st.integers(1, 40), st.integers(1, 20), st.sampled_from([10, 100]))
def test_invalid_pathological_settings_are_refused(n, k, c):
    cfg = RunConfig(method="standalone", dataset="cifar100" if c == 100 else "cifar10", clients=n,
                    partition=f"pathological:{k}")
    valid = k <= c and (n * k) % c == 0
    if valid:
        cfg.validate()
    else:
        with pytest.raises(UserError, match="pathological"):
            cfg.validate()


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                          st.sampled_from([0.0, 1.0, -0.0, 0.999, 1e-3]))


@FAST
@given(lr=finite_or_not, momentum=finite_or_not, weight_decay=finite_or_not, grad_clip=finite_or_not,
       frac=finite_or_not, val_size=st.integers(-5, 20_000), public_size=st.integers(-5, 20_000))
def test_validation_accepts_exactly_the_valid_configurations(lr, momentum, weight_decay, grad_clip, frac,
                                                             val_size, public_size):
    cfg = RunConfig(method="standalone", lr=lr, momentum=momentum, weight_decay=weight_decay,
                    grad_clip=grad_clip, frac=frac, val_size=val_size, public_size=public_size)
    valid = (math.isfinite(lr) and lr > 0 and 0 <= momentum < 1 and math.isfinite(weight_decay)
             and weight_decay >= 0 and math.isfinite(grad_clip) and grad_clip >= 0 and 0 < frac <= 1
             and val_size >= 0 and 0 <= public_size <= val_size)
    try:
        cfg.validate()
        ok = True
    except UserError as e:
        ok = False
        assert "\n" not in str(e) and str(e).startswith("--")  # names the flag
    assert ok == valid


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool]


@FAST
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), max_size=6),
       st.booleans())
def test_message_bytes_are_the_bytes_of_the_tensors_sent(specs, strided):
    msg = {}
    for i, (dt, shape) in enumerate(specs):
        t = torch.zeros(shape + [2] if strided else shape, dtype=dt)
        msg[f"t{i}"] = t[..., 0] if strided else t  # a non-contiguous view sends only its elements
    def wire_bytes(t):  # the tensor copied into a fresh dense buffer, as raw bytes
        dense = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
        return len(dense.view(torch.uint8).numpy().tobytes()) if t.numel() else 0

    serialized = sum(wire_bytes(t) for t in msg.values())
    assert message_bytes(msg) == serialized
