"""Does training clients of one architecture as one batched computation pay on this device?

1. The kernel: ten clients with the same architecture each take one SGD step's forward and
   backward pass on their own batch: one after the other, and as one computation over stacked
   parameters (`torch.func.stack_module_state` + `functional_call` under `vmap(grad)`).
2. The engine: one training round (no evaluation) of the full suite's homogeneous setting
   (10 CNN-1 clients) with `--batch-clients` and without, two federations built side by side.
Both interleaved in one run; the ratio is the figure: > 1 means batching is faster. It decides
the engine's default on a device (docs/performance.md).
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import PEAK
from mhpfl.config import RunConfig
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


def engine_rounds(method: str, device: str, data_root: str | None, rounds: int = 4) -> dict[str, float]:
    from mhpfl.engine.runner import Federation

    feds = {}
    for batched in (False, True):
        cfg = RunConfig(method=method, dataset="fmnist", clients=10, zoo="homo", train_fraction=0.1,
                        device=device, batch_clients=batched, data_root=data_root, download=False)
        feds[batched] = Federation.build(cfg)
        feds[batched].play_round(1)  # set-up at first participation, FLOP measurement: not timed
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(2, rounds + 2):  # interleaved: a noisy machine slows both alike
        for batched, fed in feds.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fed.play_round(r)
            if device == "cuda":
                torch.cuda.synchronize()
            times[batched].append(time.perf_counter() - t0)
    s, b = statistics.median(times[False]), statistics.median(times[True])
    return {"one_at_a_time_s": s, "batched_s": b, "speedup": s / b,
            "batched_steps": feds[True].batcher.batched_steps}


@pytest.mark.parametrize("method", ["standalone", "pfedlora"])
def test_engine_round_batched_vs_one_at_a_time(benchmark, data_root, method):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = benchmark.pedantic(engine_rounds, args=(method, device, data_root), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    PEAK[f"engine {method} {device}"] = res["speedup"]
    assert res["batched_steps"] > 0
