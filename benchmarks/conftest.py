"""Round-time benchmarks (pytest-benchmark), run by `make bench-time`, never by `make test`.

One torch thread by default (BENCH_THREADS to change). The machine may be shared and noisy:
every ratio is measured within one run, the engine's rounds interleaved with the floor's replays.
At the end a table prints each method's s/round, its floor, the ratio and effective FLOP/s,
with the core's measured peak fp32 rate.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
RESULTS: list[dict] = []  # filled by the tests, printed at the end
PEAK: dict[str, float] = {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def data_root() -> str | None:
    """The user's data root (default ~/.cache/mhpfl): its decoded-dataset cache is part of what
    start-up is measured with."""
    return os.environ.get("MHPFL_DATA")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS and not PEAK:
        return
    w = terminalreporter.write_line
    w("")
    w(f"== round time vs floor: {cpu_model()}, {THREADS} thread(s), torch {torch.__version__} ==")
    if "peak" in PEAK:  # measured again at the end: the better of the two is the core's
        from benchmarks.floor import peak_flops

        first, PEAK["peak"] = PEAK["peak"], max(PEAK["peak"], peak_flops())
        w(f"peak fp32 (matmul): {PEAK['peak'] / 1e9:.1f} GFLOP/s (the better of the session's first "
          f"and last measurement; the first: {first / 1e9:.1f})")
    for k, v in PEAK.items():
        if k.startswith("batched "):
            w(f"{k} clients in one vmap step vs one at a time: {v:.2f}x (> 1: batching is faster)")
        if k.startswith("engine "):
            w(f"--batch-clients, one training round of 10 CNN-1 clients, {k[7:]}: {v:.2f}x as fast as "
              "one at a time (> 1: batching is faster)")
        if k.startswith("compile "):
            w(f"torch.compile {k[8:]}: compile {v['compile_train_s']:.1f} s (train step) + "
              f"{v['compile_eval_s']:.1f} s (eval pass); compiled vs eager: train step "
              f"{v['train_speedup']:.2f}x, eval pass {v['eval_speedup']:.2f}x (> 1: compiled is faster)")
        if k.startswith("sgd "):
            w(f"SGD step {k[4:]}: torch's four passes {1e3 * v['step_torch_s']:.2f} ms, one pass (mhpfl.fused_sgd) "
              f"{1e3 * v['step_fused_s']:.2f} ms: {v['step_speedup']:.2f}x; a whole training step "
              f"{v['train_speedup']:.2f}x (> 1: one pass is faster)")
    if "startup" in PEAK:
        w(f"fixed cost (process start -> federation built: imports, data, models, FLOP analysis): "
          f"{PEAK['fixed']:.2f} s; with the round-0 evaluation: {PEAK['startup']:.2f} s"
          + (f"; a later run in the same process (a bench worker's): {PEAK['fixed_warm']:.2f} s"
             if "fixed_warm" in PEAK else ""))
    if "fixed_by_method" in PEAK:
        w("fixed cost by method (the same, best of 3; modules loaded by then among peft, transformers, "
          "torch._dynamo, sympy): " + "; ".join(
              f"{m} {t:.2f} s" + (f" ({', '.join(heavy)})" if heavy else "")
              for m, (t, heavy) in sorted(PEAK["fixed_by_method"].items(), key=lambda kv: kv[1][0])))
    if RESULTS:
        w(f"{'method':<12}{'s/round':>9}{'floor':>9}{'ratio':>7}{'GFLOP/s':>9}{'floor train':>13}"
          f"{'floor eval':>12}{'% peak':>8}{'floor SVD s':>13}{'floor server s':>16}")
        for r in RESULTS:
            pk = f"{100 * r['gflops'] * 1e9 / PEAK['peak']:.0f}" if "peak" in PEAK else "-"
            w(f"{r['method']:<12}{r['engine_s']:>9.3f}{r['floor_s']:>9.3f}{r['ratio']:>7.2f}{r['gflops']:>9.1f}"
              f"{r['floor_train_gflops']:>13.1f}{r['floor_eval_gflops']:>12.1f}{pk:>8}"
              f"{r['floor_svd_s']:>13.3f}{r['floor_server_s']:>16.3f}")
        w("GFLOP/s: 2 FLOPs per multiply-add, the round's passes as torch's FlopCounterMode counts them "
          "in the floor's replay (a training pass: its forward and the backward autograd runs for its "
          "trainable parameters) over the engine's round time; floor train/eval: the floor's rate on "
          "each kind of pass; floor SVD s: the round's SVDs (FedKD's compression) replayed, part of the floor; "
          "floor server s: the passes of the modules the server trains (FedTGP's generator, FedGH's header), "
          "part of the floor, not of its FLOPs.")
