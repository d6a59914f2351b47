"""benchmarks/floor.py counts the FLOPs of the work its replay runs, so that the floor's training
and evaluation FLOP rates (docs/performance.md) compare like with like."""
from __future__ import annotations

import torch

from benchmarks.floor import Floor, Pass
from mhpfl.engine.meter import forward_flops
from mhpfl.models import build_model

SHAPE = (1, 28, 28)
BATCH = 16


def _floor(model, trainable, train=True):
    return Floor([Pass(model, (BATCH, *SHAPE), train, tuple(trainable), 0)], lr=0.01, momentum=0.9,
                 weight_decay=0.0, grad_clip=10.0)


def test_floor_counts_the_backward_pass_autograd_runs():
    torch.manual_seed(0)
    model = build_model("cnn1", SHAPE, 10)
    fwd = forward_flops(model, SHAPE) * BATCH
    # inference: fvcore's forward count
    assert _floor(model, (), train=False).flops == fwd
    # everything trains: weight gradients and input gradients of every layer but the first
    full = _floor(model, model.parameters()).flops
    assert 2 * fwd < full < 3 * fwd
    # the model frozen and only its last layer trains (pFedLoRA's adapter phase, with LoRA on fc3):
    # the backward pass stops there, about one forward pass in all (the old count said 3)
    last = _floor(model, model.fc3.parameters()).flops
    assert fwd < last < 1.05 * fwd
    # counting takes no SGD step (the floor replays on a copy of the model)
    copy = _floor(model, model.parameters()).passes[0].module
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
    assert all(p.grad is None for p in copy.parameters())
