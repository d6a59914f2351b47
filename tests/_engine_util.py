"""Helpers shared by the engine tests (test_batching, test_speed, test_gpu, the Flower tests):
short method options, a federation played round by round, parameter comparison, small configs."""
from __future__ import annotations

import torch

from mhpfl.config import RunConfig
from mhpfl.engine.runner import Federation, Recorder

EVERY_METHOD = ["standalone", "fedavg", "fedmd", "fedkd", "fml", "lgfedavg", "fd", "fedproto", "fedgh",
                "fedtgp", "pfedlora"]

# what keeps a round short: FedMD's transfer learning is many epochs of l1/CE steps
SHORT = {"fedmd": dict(transfer_public_epochs=1, transfer_private_epochs=1, digest_epochs=1)}

# Float32 tolerance of batched vs one-at-a-time parameters after a round (float32_tol: 3e-4 unless listed).
# FedMD's digest minimises an l1 loss, whose gradient is the sign of (logit - consensus): a rounding
# difference on a logit near its target flips a term of the gradient, so its float32 results differ
# by whole flipped terms, not by rounding (1e-7 to 7e-4 per client on an Intel Xeon, 8e-5 on an AMD
# EPYC). A wrong step (one step with a neighbour's batch) moves it by 1.6e-2 or more, and
# test_batched_training_is_exact_in_float64 holds FedMD to 1e-10.
FLOAT32_TOL = {"fedmd": 4e-3}


def float32_tol(method: str) -> float:
    return FLOAT32_TOL.get(method, 3e-4)


def play(cfg, rounds: int, double: bool = False):
    """Build a federation, play `rounds` rounds; every client's parameters (flat), the bytes
    sent, the FLOPs charged and how many steps were computed batched."""
    if double:
        torch.set_default_dtype(torch.float64)
    try:
        fed = Federation.build(cfg)
        if double:
            for s in {id(s): s for c in fed.clients for s in (c.data.train, c.data.val, c.data.test, c.public)}.values():
                s.x = s.x.double()
        rec = Recorder(cfg, fed.method, [c.arch for c in fed.clients], [c.num_train for c in fed.clients])
        for r in range(1, rounds + 1):
            fed.play_round(r, rec)
    finally:
        torch.set_default_dtype(torch.float32)
    params = [torch.cat([p.detach().flatten() for m in c.modules for p in m.parameters()]) for c in fed.clients]
    return params, dict(rec.pending), fed.meter.total, fed.batcher.batched_steps if fed.batcher else 0


def assert_same(a, b, tol):
    for i, (p, q) in enumerate(zip(a, b)):
        assert p.shape == q.shape
        err = float((p - q).abs().max() / p.abs().max())
        assert err <= tol, f"client {i}: batched parameters differ by {err:.2e} (relative)"


def small(method: str, data_root: str, **kw) -> RunConfig:
    """The Flower tests' fixed small configuration: Fashion-MNIST, 5 clients, 3 rounds, evaluated
    before training and after the last round (evaluation dominates the time; CI runs this)."""
    opts = {"public_subset": 200, "transfer_public_epochs": 1, "transfer_private_epochs": 1} if method == "fedmd" else {}
    base = dict(method=method, dataset="fmnist", clients=5, frac=1.0, rounds=3, train_fraction=0.05,
                batch_size=32, seed=0, data_root=data_root, download=False, public_size=1000,
                zoo="homo" if method == "fedavg" else "hetero", eval_every=3, method_options=opts)
    return RunConfig(**{**base, **kw})
