"""How good the bench's ETA is, replayed from a finished suite. Run by hand, not by pytest:

    python benchmarks/eta_replay.py quick results/quick             # the bench's start order
    python benchmarks/eta_replay.py quick results/quick --order suite --lines

Every run's own wall time (its summary.json) is scheduled on --jobs workers in the given start
order (a run starts when a worker is free, as the local executor does), its evaluated rounds are
reported at even shares of its time, and the bench's own progress bar (`runner._Progress`, on a fake
clock) gives the ETA each finished run's line would print. The truth is the simulated end minus
that moment. `--order bench` is `runner.longest_first` (what `mhpfl bench` does); `--order suite`
is the suite file's order (methods one after another, seeds within). The runs' times were measured
two at a time on the machine that ran them, so this replays that machine's bench, not this one's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


def replay(todo: list, seconds: list[float], jobs: int) -> tuple[float, list[tuple[float, float, float]]]:
    """Simulated end, and (time, ETA, true time left) at every run's end where an ETA is printed."""
    from mhpfl.benchmark.runner import _Progress

    now = [0.0]
    bar = _Progress(todo, enabled=False, log=lambda m: None, clock=lambda: now[0])
    free, events, seq = [0.0] * jobs, [], itertools.count()  # seq: at equal times, in this order
    for i, (e, s) in enumerate(zip(todo, seconds)):
        w = min(range(jobs), key=lambda k: free[k])
        start, free[w] = free[w], free[w] + s
        every = e.cfg.eval_every or 1
        events += [(start, next(seq), "start", i, 0)]
        events += [(start + s * r / e.cfg.rounds, next(seq), "round", i, r) for r in range(every, e.cfg.rounds + 1, every)]
        events += [(free[w], next(seq), "done", i, 0)]
    end, out = max(free), []
    for t, _, kind, i, r in sorted(events):
        now[0] = t
        if kind == "done":
            bar.done({"index": i, "ok": True, "best": 0.0, "wall": seconds[i]})
            eta = bar.eta()
            if eta is not None:
                out.append((t, eta, end - t))
        else:
            bar.event((kind, i) if kind == "start" else (kind, i, r))
    return end, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", help="a shipped suite's name or a suite file")
    ap.add_argument("out", help="the folder holding the suite's finished runs (runs/*/summary.json)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--order", choices=["bench", "suite"], default="bench")
    ap.add_argument("--lines", action="store_true", help="print every ETA line, not only the summary")
    a = ap.parse_args()

    from mhpfl.benchmark.runner import longest_first, run_dirname
    from mhpfl.benchmark.suite import load_suite

    runs = list(load_suite(a.suite).runs().values())
    todo = longest_first(runs) if a.order == "bench" else runs
    missing = [run_dirname(e) for e in todo if not (Path(a.out) / "runs" / run_dirname(e) / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the suite's runs are not finished in {a.out} "
                         f"(e.g. {missing[0]}); replay a folder that holds the whole suite")
    secs = [json.loads((Path(a.out) / "runs" / run_dirname(e) / "summary.json").read_text())["wall_seconds"]
            for e in todo]
    end, lines = replay(todo, secs, a.jobs)
    errs = [abs(eta - true) for _, eta, true in lines]
    if a.lines:
        for t, eta, true in lines:
            print(f"at {t / 60:6.1f} min: ETA {eta / 60:6.1f} min, true {true / 60:6.1f} min")
    t, eta, true = lines[0]
    print(f"{a.suite}, {len(todo)} runs, {a.jobs} workers, {a.order} order: simulated end {end / 60:.1f} min "
          f"(the runs' summed time / workers: {sum(secs) / a.jobs / 60:.1f}); ETA error over the "
          f"{len(lines)} run-end lines: mean {statistics.mean(errs) / 60:.1f} min, max {max(errs) / 60:.1f}; "
          f"the first ETA, at {t / 60:.1f} min: {eta / 60:.0f} min for {true / 60:.0f} true")


if __name__ == "__main__":
    main()
