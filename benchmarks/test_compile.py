"""Would `torch.compile` pay for its compile time over a run?

One client's SGD step (batch 64: forward, cross-entropy, backward, SGD with momentum and weight
decay) and one evaluation forward pass (batch 256, inference mode) of a zoo model, eager and
compiled (inductor, its on-disk caches disabled: a cold compile), interleaved in one run, median
of 5 x 10 calls. Reported: the compile time of each (first call), and eager time / compiled time
(> 1: compiled is faster). A run compiles every architecture it uses, once per batch shape (a
client's last, smaller batch is another), so compiling pays only where (saved time per call) x
(calls in a run) exceeds those compiles (docs/performance.md).

On a GPU, where a step of these CNNs is launch-bound (docs/performance.md, "GPU"), the same
comparison with the compile modes that cut launches (`reduce-overhead`: CUDA graphs) is run by
hand (session AB on an H200, docs/measurements/gpu-h200-2026-12-04b/compile.json: training
1.43-1.46x with CUDA graphs, 0.83x without):

    python benchmarks/test_compile.py --device cuda --shape 3 32 32 --modes default reduce-overhead
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mhpfl.models import build_model

TRAIN_BATCH, EVAL_BATCH, REPEATS, CALLS = 64, 256, 5, 10


def compare(arch: str, device: str = "cpu", mode: str | None = None, shape: tuple = (1, 28, 28),
            classes: int = 10) -> dict[str, float]:
    """Eager vs `torch.compile(mode=mode)` for `arch` on inputs of `shape`, on `device` (timed to
    the device's completion: CUDA is synchronised around every timed block)."""
    import torch._inductor.config as inductor

    inductor.force_disable_caches = True  # a cold compile, as a user's first run pays it
    torch._dynamo.reset()
    dev = torch.device(device)

    def make():
        torch.manual_seed(0)
        m = build_model(arch, shape, classes).to(dev, memory_format=torch.channels_last)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)

    x = torch.randn(TRAIN_BATCH, *shape, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (TRAIN_BATCH,), device=dev)
    xe = torch.randn(EVAL_BATCH, *shape, device=dev).contiguous(memory_format=torch.channels_last)
    eager, opt_e = make()
    plain, opt_c = make()
    compiled = torch.compile(plain, mode=mode)

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
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
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
    from benchmarks.conftest import PEAK  # here: the file also runs as a script (main)

    res = benchmark.pedantic(compare, args=(arch,), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    PEAK[f"compile {arch}"] = res
    assert res["train_speedup"] > 0 and res["eval_speedup"] > 0


def main() -> None:
    ap = argparse.ArgumentParser(description="torch.compile vs eager, one SGD step and one evaluation pass")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--archs", nargs="+", default=["cnn1", "cnn5"])
    ap.add_argument("--modes", nargs="+", default=["default"], help="torch.compile modes (default, "
                    "reduce-overhead, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], help="C H W (CIFAR: 3 32 32)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--out", default="compile.json", help="rewritten after every measurement")
    a = ap.parse_args()
    info = {"device": a.device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
            "shape": a.shape, "train_batch": TRAIN_BATCH, "eval_batch": EVAL_BATCH, "rows": []}
    for arch in a.archs:
        for mode in a.modes:
            res = compare(arch, a.device, None if mode == "default" else mode, tuple(a.shape), a.classes)
            info["rows"].append({"arch": arch, "mode": mode, **{k: round(v, 6) for k, v in res.items()}})
            print(info["rows"][-1], flush=True)
            Path(a.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
