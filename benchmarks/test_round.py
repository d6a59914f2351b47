"""One round of the quick suite's N10 setting (evaluation every round) through mhpfl's engine,
for each method, against its floor (benchmarks/floor.py); the core's peak; start-up.

The same round-vs-floor measurement runs outside pytest on any device and setting (the GPU
check runs it on CUDA; where the setting's dataset is absent, a random stand-in of its shape and
size is used, as benchmarks/paper_cost.py does):

    python -m benchmarks.test_round --device cuda --suite paper --setting cifar10-N10-C100 \
        --methods standalone pfedlora --out round_floor.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import PEAK, RESULTS
from benchmarks.floor import Floor, Tracer, peak_flops
from mhpfl.benchmark.suite import load_suite
from mhpfl.engine import run

ROUNDS = 7  # rounds 3..R are timed, each against the floor of that same round (rounds 1 and 2
# hold most of the clients' set-up at first participation); the median of five rounds, since a
# median of three moved a method's ratio from 1.04x to 1.37x on a machine whose speed drifts
# within the minute (the Intel Xeon, session AE)
SETTING = "N10-C100"


def n10_configs(data_root):
    over = {"data_root": data_root} if data_root else {}
    suite = load_suite("quick", overrides=over, only_available=True)
    # 10% of the data: the setting's size when docs/performance.md's table was measured (quick: 5%)
    return {e.method: dataclasses.replace(e.cfg, rounds=ROUNDS, eval_every=1, train_fraction=0.1)
            for e in suite.entries
            if e.group == "main" and e.setting == SETTING and e.seed == suite.entries[0].seed}


METHODS = list(n10_configs(None))


def measure(cfg) -> dict:
    """Each engine round from the third on against the floor of that same round: the round's passes
    are traced while it runs, then replayed (training, inference, decompositions) before the next
    round starts, so a noisy machine slows both alike. At partial participation every round has
    its own clients, architectures and data sizes, so a floor traced in another round would time
    other work (full's N100-C10 Standalone read 1.23x so, 1.01-1.04x against each round's own floor).
    Reported: medians over the timed rounds (the ratio: of each round's engine time over its own
    floor's), and every timed round (`per_round`)."""
    rounds: list[dict] = []
    state: dict = {"start": None}

    with Tracer() as tracer:
        def on_round(row):
            now = time.perf_counter()
            r = int(row["round"])
            tracer.recording = False
            if r >= 3:
                fl = Floor(tracer.passes, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip, cfg.device,
                           decompositions=tracer.decompositions)
                x = {"round": r, "engine": now - state["start"], "train": fl.replay("train"),
                     "eval": fl.replay("eval"), "server": fl.replay("server"), "svd": fl.replay_decompositions(),
                     "flops": fl.flops, "train_flops": sum(p.flops for p in fl.passes if p.train),
                     "steps": fl.steps, "server_steps": fl.server_steps, "svds": len(fl.decompositions),
                     "engine_train_flops": int(row["train_flops"])}
                x["floor"] = x["train"] + x["eval"] + x["server"] + x["svd"]
                rounds.append(x)
            tracer.passes, tracer.decompositions = [], []
            tracer.recording = r >= 2  # the next round is traced
            state["start"] = time.perf_counter()

        run(cfg, progress=False, on_round=on_round)

    def med(f):
        return statistics.median(f(x) for x in rounds)

    return {"method": cfg.method, "engine_s": med(lambda x: x["engine"]), "floor_s": med(lambda x: x["floor"]),
            "ratio": med(lambda x: x["engine"] / x["floor"]),
            "gflops": med(lambda x: 2 * x["flops"] / x["engine"] / 1e9), "steps": med(lambda x: x["steps"]),
            "floor_svd_s": med(lambda x: x["svd"]), "svds": med(lambda x: x["svds"]),
            "floor_server_s": med(lambda x: x["server"]), "server_steps": med(lambda x: x["server_steps"]),
            "floor_train_gflops": med(lambda x: 2 * x["train_flops"] / x["train"] / 1e9),
            "floor_eval_gflops": med(lambda x: 2 * (x["flops"] - x["train_flops"]) / x["eval"] / 1e9
                                     if x["flops"] > x["train_flops"] else 0.0),
            "per_round": rounds}


def test_peak_fp32(benchmark):
    PEAK["peak"] = benchmark.pedantic(peak_flops, rounds=1, iterations=1)
    assert PEAK["peak"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_round_vs_floor(benchmark, data_root, method):
    cfg = n10_configs(data_root)[method]
    res = benchmark.pedantic(measure, args=(cfg,), rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    RESULTS.append(res)
    assert res["steps"] > 0 and res["floor_s"] > 0


PROBE = ("import os, sys, time\nfrom mhpfl.engine import runner\n"
         "def stamp(*a, **k):\n    print(time.time(), *(m for m in HEAVY if m in sys.modules), flush=True)\n"
         "    os._exit(0)\n"
         "HEAVY = ('peft', 'transformers', 'torch._dynamo', 'sympy')\n"
         "{patch}\nfrom mhpfl.cli import main\nmain({args!r})\n")
STAMP_BUILT = "build = runner.Federation.build\nrunner.Federation.build = classmethod(lambda cls, cfg: stamp(build(cfg)))"


def compiled_bytecode() -> None:
    """mhpfl's modules compiled to bytecode, as pip leaves a regular install (an editable one is
    compiled at its first import, unless PYTHONDONTWRITEBYTECODE is set: then at every start, 0.05
    s of it; `make install` compiles them too). A start-up benchmark measures a user's start."""
    import compileall

    import mhpfl

    compileall.compile_dir(os.path.dirname(mhpfl.__file__), quiet=1)  # where it may write


def cli_args(method, data_root, out, *extra):
    return (["run", method, "--clients", "10", "--train-fraction", "0.1", "--rounds", "1", "--quiet",
             "--no-download", "--out", str(out), *extra] + (["--data-root", str(data_root)] if data_root else []))


def time_to_stamp(code: str) -> tuple[float, list[str]]:
    """Seconds from starting `python -c code` to its stamp, and the heavy modules loaded by then."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=env).stdout.split("\n")[-2].split()
    return float(out[0]) - t0, out[1:]


def test_startup(benchmark, data_root, tmp_path):
    """A run's fixed cost: from process start to a built federation (imports, data, partition,
    models, FLOP analysis) of `mhpfl run standalone` on the N10 setting through the CLI, data
    cache warm; and from process start to the end of round 0 (that plus the round-0 evaluation
    of every client). The child prints the wall clock at that point and exits at once, so the
    interpreter's exit is not counted. Then the fixed cost of a later run in a warm process, as
    in a bench worker, which imports torch once for all its runs: Federation.build alone. mhpfl's
    bytecode is compiled first, as in a regular install."""
    compiled_bytecode()
    args = cli_args("standalone", data_root, tmp_path / "run")
    built = PROBE.format(args=args, patch=STAMP_BUILT)
    round0 = PROBE.format(args=args,
                          patch="runner.Recorder.on_round = property(lambda self: stamp, lambda self, v: None)")
    subprocess.run([sys.executable, "-c", round0], check=True, capture_output=True)  # warms the dataset cache
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def once(code):
        return time_to_stamp(code)[0]

    times = benchmark.pedantic(lambda: [(once(built), once(round0)) for _ in range(3)], rounds=1, iterations=1)
    PEAK["fixed"] = min(t[0] for t in times)
    PEAK["startup"] = min(t[1] for t in times)
    assert 0 < PEAK["fixed"] < PEAK["startup"]
    # a bench worker imports torch once: a later run in the same process pays only data, partition,
    # models and FLOP analysis (the same setting, other seeds, after one whole run)
    warm = ("import dataclasses, time\nfrom mhpfl.config import RunConfig\nfrom mhpfl.engine import run\n"
            "from mhpfl.engine.runner import Federation\n"
            "cfg = RunConfig(method='standalone', clients=10, train_fraction=0.1, rounds=1, download=False{root})\n"
            "run(cfg, progress=False)\nts = []\nfor seed in (1, 2, 3):\n"
            "    t = time.perf_counter(); Federation.build(dataclasses.replace(cfg, seed=seed))\n"
            "    ts.append(time.perf_counter() - t)\nprint(min(ts))\n"
            ).format(root=f", data_root={str(data_root)!r}" if data_root else "")
    PEAK["fixed_warm"] = float(subprocess.run([sys.executable, "-c", warm], check=True, capture_output=True,
                                              text=True, env=env).stdout.split()[-1])
    assert 0 < PEAK["fixed_warm"] < PEAK["fixed"]


def test_startup_by_method(benchmark, data_root, tmp_path):
    """Every built-in method's fixed cost, as test_startup measures Standalone's (process start ->
    federation built, best of 3, the methods interleaved), with the heavy modules loaded by then:
    pFedLoRA's LoRA readings import peft, which imports transformers (and with it torch._dynamo
    and sympy); its parallel-model reading (`--adapter model`) does not."""
    from mhpfl.methods import BUILTIN

    compiled_bytecode()
    cases = {m: cli_args(m, data_root, tmp_path / m, *(["--zoo", "homo"] if m == "fedavg" else []))
             for m in BUILTIN}
    cases["pfedlora adapter=model"] = cli_args("pfedlora", data_root, tmp_path / "pfedlora-model",
                                               "--adapter", "model")

    def measure_all():
        best: dict[str, tuple[float, list[str]]] = {}
        for _ in range(3):
            for name, args in cases.items():
                t, heavy = time_to_stamp(PROBE.format(args=args, patch=STAMP_BUILT))
                if name not in best or t < best[name][0]:
                    best[name] = (t, heavy)
        return best

    PEAK["fixed_by_method"] = benchmark.pedantic(measure_all, rounds=1, iterations=1)
    assert all(t > 0 for t, _ in PEAK["fixed_by_method"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description="One round through the engine against its floor, per method")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--suite", default="quick", choices=["quick", "full", "paper"])
    ap.add_argument("--setting", default=SETTING)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method of the setting")
    ap.add_argument("--train-fraction", type=float, default=None,
                    help="default: the setting's (make bench-time's table uses 0.1 of quick's N10)")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help=f"rounds run (3.. timed; default {ROUNDS}); at partial participation enough for "
                         "every client to take part (full's N100-C10: 10)")
    ap.add_argument("--data-root", default=os.environ.get("MHPFL_DATA"))
    ap.add_argument("--out", default="round_floor.json", help="rewritten after every method")
    a = ap.parse_args()
    from benchmarks.paper_cost import GpuUtilisation, check_names, measured_entries, suite_on_data

    plain = load_suite(a.suite)
    methods = a.methods or plain.methods
    check_names(plain, [a.setting], methods)
    tmp = tempfile.TemporaryDirectory()
    suite, _, data = suite_on_data(a.suite, [a.setting], a.data_root, a.device, tmp.name)
    report = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
              "torch_threads": torch.get_num_threads(), "suite": a.suite, "setting": a.setting, "data": data,
              "rows": []}
    for e in measured_entries(suite, [a.setting], methods):
        cfg = dataclasses.replace(e.cfg, rounds=a.rounds, eval_every=1)
        if a.train_fraction is not None:
            cfg = dataclasses.replace(cfg, train_fraction=a.train_fraction)
        with GpuUtilisation() as gpu:
            res = measure(cfg)
        report["rows"].append({**res, "gpu_util_pct": gpu.mean})  # over the engine's rounds and the replays
        print(report["rows"][-1], flush=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    for r in report["rows"]:
        print(f"{r['method']}: engine {r['engine_s']:.3f} s/round, floor {r['floor_s']:.3f} s, "
              f"{r['ratio']:.2f}x the floor, {r['gflops']:.1f} GFLOP/s")
    print(f"data: {data}; device {a.device}; written {a.out}")


if __name__ == "__main__":
    main()
