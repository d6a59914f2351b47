"""SGD's momentum step in one pass (`mhpfl.fused_sgd`) against torch's four passes.

A zoo model's optimizer step alone (the gradient of one batch of 64, the engine's lr, momentum
0.9, weight decay 1e-3; after the first step, so with momentum buffers), and a whole training
step (forward, cross-entropy, backward, clipping at 50, the step), each through `lean.SGD` with
the kernel and with MHPFL_FUSED_SGD=0, interleaved in one run, median of 5 x 20 calls.
Reported: torch's passes' time / the kernel's (> 1: one pass is faster). The two give the same
parameters bit for bit (tests/test_speed.py).
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import PEAK
from mhpfl import fused_sgd
from mhpfl.lean import SGD, clip_grad_norm
from mhpfl.models import build_model

BATCH, REPEATS, CALLS = 64, 5, 20


@contextmanager
def fused(on: bool):
    before = os.environ.get("MHPFL_FUSED_SGD")
    os.environ["MHPFL_FUSED_SGD"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MHPFL_FUSED_SGD"]
        else:
            os.environ["MHPFL_FUSED_SGD"] = before


def compare(arch: str) -> dict[str, float]:
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    runs = {}
    for on in (True, False):
        torch.manual_seed(0)
        model = build_model(arch, (1, 28, 28), 10)
        params = list(model.parameters())
        opt = SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-3)

        def train(model=model, params=params, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm(params, 50.0)
            opt.step()

        with fused(on):
            train()  # the first step makes the momentum buffers
            train()  # the second compiles and checks the kernel
        runs[on] = (train, opt)

    def timed(fn, on):
        with fused(on):
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            return (time.perf_counter() - t0) / CALLS

    samples = {k: [] for k in ("step_fused", "step_torch", "train_fused", "train_torch")}
    for _ in range(REPEATS):  # interleaved: a noisy machine slows both alike
        for on, name in ((True, "fused"), (False, "torch")):
            train, opt = runs[on]
            samples[f"step_{name}"].append(timed(opt.step, on))
            samples[f"train_{name}"].append(timed(train, on))
    med = {k: statistics.median(v) for k, v in samples.items()}
    res = {f"{k}_s": v for k, v in med.items()}
    res["step_speedup"] = med["step_torch"] / med["step_fused"]
    res["train_speedup"] = med["train_torch"] / med["train_fused"]
    res["kernel_used"] = kernel_used(runs[True][1])
    return res


def kernel_used(opt) -> bool:
    """Whether a step of `opt` with the kernel on runs the kernel (not torch's passes)."""
    calls, call = [], fused_sgd._call
    fused_sgd._call = lambda *a: calls.append(1) or call(*a)
    try:
        with fused(True):
            opt.step()
    finally:
        fused_sgd._call = call
    return bool(calls)


@pytest.mark.parametrize("arch", ["cnn1", "cnn5"])
def test_fused_sgd_vs_torch_passes(benchmark, arch):
    if fused_sgd.kernel(1e-3, 0.9, 0.01) is None:
        pytest.skip("mhpfl.fused_sgd is not available here (no C compiler, or MHPFL_FUSED_SGD=0)")
    res = benchmark.pedantic(compare, args=(arch,), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    PEAK[f"sgd {arch}"] = res
    assert res["kernel_used"] and res["step_speedup"] > 0
