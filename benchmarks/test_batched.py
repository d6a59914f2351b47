"""Would training clients of one architecture as one batched computation pay on this device?

Ten clients with the same architecture each take one SGD step's forward and backward pass on
their own batch: one after the other (what the engine does), and as one computation over
stacked parameters (`torch.func.stack_module_state` + `functional_call` under `vmap(grad)`),
interleaved in one run. The ratio is the figure: > 1 means batching is faster. Its result
decides whether the engine batches clients on a device (docs/performance.md).
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import PEAK
from mhpfl.models import build_model

CLIENTS, BATCH, REPEATS = 10, 64, 5


def setup(arch: str, device: str):
    torch.manual_seed(0)
    models = [build_model(arch, (1, 28, 28), 10).to(device) for _ in range(CLIENTS)]
    xs = torch.randn(CLIENTS, BATCH, 1, 28, 28, device=device)
    ys = torch.randint(0, 10, (CLIENTS, BATCH), device=device)
    return models, xs, ys


def compare(arch: str, device: str) -> dict[str, float]:
    from torch.func import functional_call, grad, stack_module_state, vmap

    models, xs, ys = setup(arch, device)
    params, buffers = stack_module_state(models)
    shell = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return F.cross_entropy(functional_call(shell, (p, b), (x,)), y)

    batched_grad = vmap(grad(loss))

    def one_at_a_time():
        for m, x, y in zip(models, xs, ys):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()

    def batched():
        batched_grad(params, buffers, xs, ys)

    def timed(fn):
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    seq, bat = [], []
    for _ in range(REPEATS):  # interleaved: a noisy machine slows both alike
        seq.append(timed(one_at_a_time))
        bat.append(timed(batched))
    s, b = statistics.median(seq), statistics.median(bat)
    return {"one_at_a_time_s": s, "batched_s": b, "speedup": s / b}


@pytest.mark.parametrize("arch", ["cnn1", "cnn5"])
def test_batched_clients_vs_one_at_a_time(benchmark, arch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = benchmark.pedantic(compare, args=(arch, device), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    PEAK[f"batched {arch} {device}"] = res["speedup"]
    assert res["one_at_a_time_s"] > 0 and res["batched_s"] > 0
