"""Would `torch.compile` pay for its compile time over a run?

One client's SGD step (batch 64: forward, cross-entropy, backward, SGD with momentum and weight
decay) and one evaluation forward pass (batch 256, inference mode) of a zoo model, eager and
compiled (inductor, its on-disk caches disabled: a cold compile), interleaved in one run, median
of 5 x 10 calls. Reported: the compile time of each (first call), and eager time / compiled time
(> 1: compiled is faster). A run compiles every architecture it uses, once per batch shape (a
client's last, smaller batch is another), so compiling pays only where (saved time per call) x
(calls in a run) exceeds those compiles (docs/performance.md).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import PEAK
from mhpfl.models import build_model

TRAIN_BATCH, EVAL_BATCH, REPEATS, CALLS = 64, 256, 5, 10


def compare(arch: str) -> dict[str, float]:
    import torch._inductor.config as inductor

    inductor.force_disable_caches = True  # a cold compile, as a user's first run pays it
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        m = build_model(arch, (1, 28, 28), 10)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)

    x = torch.randn(TRAIN_BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (TRAIN_BATCH,))
    xe = torch.randn(EVAL_BATCH, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    eager, opt_e = make()
    plain, opt_c = make()
    compiled = torch.compile(plain)

    def step(model, opt):
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(model):
        model.eval()
        with torch.inference_mode():
            model(xe)

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    res = {"compile_train_s": once(lambda: step(compiled, opt_c)),
           "compile_eval_s": once(lambda: infer(compiled))}
    samples = {k: [] for k in ("train_eager", "train_compiled", "eval_eager", "eval_compiled")}
    for _ in range(REPEATS):  # interleaved: a noisy machine slows both alike
        samples["train_eager"].append(once(lambda: [step(eager, opt_e) for _ in range(CALLS)]) / CALLS)
        samples["train_compiled"].append(once(lambda: [step(compiled, opt_c) for _ in range(CALLS)]) / CALLS)
        samples["eval_eager"].append(once(lambda: [infer(eager) for _ in range(CALLS)]) / CALLS)
        samples["eval_compiled"].append(once(lambda: [infer(compiled) for _ in range(CALLS)]) / CALLS)
    med = {k: statistics.median(v) for k, v in samples.items()}
    res.update({f"{k}_s": v for k, v in med.items()})
    res["train_speedup"] = med["train_eager"] / med["train_compiled"]
    res["eval_speedup"] = med["eval_eager"] / med["eval_compiled"]
    return res


@pytest.mark.parametrize("arch", ["cnn1", "cnn5"])
def test_compiled_vs_eager(benchmark, arch):
    pytest.importorskip("torch._inductor")
    res = benchmark.pedantic(compare, args=(arch,), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    PEAK[f"compile {arch}"] = res
    assert res["train_speedup"] > 0 and res["eval_speedup"] > 0
