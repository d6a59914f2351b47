"""`mhpfl bench`, `mhpfl report`, `mhpfl check` (merged into `mhpfl.cli`'s commands)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mhpfl.errors import ArgumentParser, UserError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda: device of every run (default: the suite's, cpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel (processes; default: one per available core, at most the "
                        "runs to do; each gets cores/J torch threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: cores/J; capped so jobs x threads never "
                        "exceeds the cores); 1 on a machine shared with other work")
    p.add_argument("--data-root", default=None, help="dataset directory (default $MHPFL_DATA or ~/.cache/mhpfl)")
    p.add_argument("--no-download", action="store_true", help="never download datasets")
    p.add_argument("--batch-clients", action=argparse.BooleanOptionalAction, default=None,
                   help="every run trains clients that share an architecture and a loss as one batched "
                        "computation (same results up to float rounding; default: the suite's, off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(args) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if args.device:
        o["device"] = args.device
    root = args.data_root or os.environ.get("MHPFL_DATA")
    if root:
        o["data_root"] = root
    if args.no_download:
        o["download"] = False
    if args.batch_clients is not None:
        o["batch_clients"] = args.batch_clients
    return o


def cmd_bench(argv: list[str]) -> int:
    from mhpfl.benchmark.suite import shipped_suites

    p = ArgumentParser(prog="mhpfl bench", description=(
        "Run a benchmark suite (cached: finished runs are skipped; resumable after any interruption), "
        "then write its report."))
    p.add_argument("suite", help=f"a shipped suite ({', '.join(shipped_suites())}) or a path to a suite .toml")
    p.add_argument("--out", default=None, help="output folder (default runs/SUITE)")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and which are cached), run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--target", type=float, default=None, help="accuracy target (%%) of the cost table")
    _common(p)
    g = p.add_argument_group("executor (where the runs run)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: processes on this machine (--jobs); ray: Ray tasks on a local Ray instance "
                        "or a cluster (--address); needs pip install 'mhpfl-bench[ray]'")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start a local "
                        "Ray instance)")
    g.add_argument("--run-cpus", type=float, default=None, help="CPUs each run reserves on Ray (default 1)")
    g.add_argument("--run-gpus", type=float, default=None,
                   help="GPUs each run reserves on Ray, fractions allowed (default with --device cuda: "
                        "0.25, four runs share a GPU, which measured 3.3x cheaper than one; else 0)")
    g.add_argument("--max-retries", type=int, default=None,
                   help="Ray retries of a run whose worker or node died (default 2)")
    args = p.parse_args(argv)
    from mhpfl.benchmark.report import check_target, write_report
    from mhpfl.benchmark.runner import check_workers, finished, run_suite
    from mhpfl.benchmark.suite import load_suite

    check_target(args.target)  # before any training
    check_workers(args.jobs, args.threads)  # --dry-run too: it shows what the real command would do
    ray_opts = None
    if args.executor == "ray":
        from mhpfl.benchmark.ray_executor import RayOptions

        if args.jobs not in (None, 1):
            raise UserError("--jobs is for --executor local; with --executor ray every run is a Ray task "
                            "(size them with --run-cpus / --run-gpus)")
        given = {k: v for k, v in (("run_cpus", args.run_cpus), ("max_retries", args.max_retries)) if v is not None}
        ray_opts = RayOptions(address=args.address, run_gpus=args.run_gpus, **given)
    elif args.address or any(v is not None for v in (args.run_cpus, args.run_gpus, args.max_retries)):
        raise UserError("--address, --run-cpus, --run-gpus and --max-retries need --executor ray "
                        "(the local executor sizes runs with --jobs and --threads)")
    suite = load_suite(args.suite, overrides=_overrides(args))
    out = args.out or f"runs/{suite.name}"
    if ray_opts is not None:  # before any run, and with --dry-run: it refuses what the real run refuses
        for device in {e.cfg.device for e in suite.runs().values()}:
            ray_opts.validate(device)
    if args.dry_run:
        from pathlib import Path

        runs = suite.runs()
        for i, e in enumerate(runs.values()):
            state = "cached" if finished(Path(out), e) and not args.force else "to run"
            c = e.cfg
            print(f"{i + 1:4d}. {state:<7} {e.run_id:<48} rounds {c.rounds}  N {c.clients}  C {c.frac:g}  "
                  f"train fraction {c.train_fraction:g}  key {e.key}")
        return 0
    res = run_suite(suite, out, force=args.force, jobs=args.jobs, threads=args.threads, progress=not args.quiet,
                    executor=args.executor, ray=ray_opts)
    if res.trained or res.failed:
        print(f"suite {suite.name}: {res.trained} run(s) trained in {res.wall_seconds / 60:.1f} min, "
              f"{res.cached} cached, {len(res.failed)} failed")
    if not args.no_report and res.total > len(res.failed):
        try:
            files = write_report(out, target=args.target)
            print(f"report: {len(files)} files in {out} (accuracy.md, cost.md, headline.md, plots, README.md)")
        except UserError as e:
            if not res.failed:
                raise
            print(f"error: {e}", file=sys.stderr)
    if res.failed:
        print(f"error: {len(res.failed)} run(s) failed (details in {out}/failed/); first: "
              f"{res.failed[0][0].run_id}: {res.failed[0][1]}; fix and rerun the same command "
              "(finished runs are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_report(argv: list[str]) -> int:
    p = ArgumentParser(prog="mhpfl report", description=(
        "Write tables (accuracy, cost, headline, ablation: .md/.csv/.tex), plots (.png/.pdf) and a "
        "README into a folder of finished bench runs."))
    p.add_argument("dir", help="output folder of 'mhpfl bench'")
    p.add_argument("--target", type=float, default=None,
                   help="accuracy target (%%) for the cost table (default: the suite's, else the lowest "
                        "best accuracy among the methods of each setting)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    args = p.parse_args(argv)
    from mhpfl.benchmark.report import write_report

    files = write_report(args.dir, target=args.target, do_plots=not args.no_plots)
    print(f"report: wrote {len(files)} files in {args.dir}: {', '.join(files)}")
    return 0


def cmd_check(argv: list[str]) -> int:
    from mhpfl.benchmark.check import DEFAULT_REFERENCE, DEFAULT_SUITE, locate_reference, run_check

    p = ArgumentParser(prog="mhpfl check", description=(
        "Regression check: rerun the smoke suite (never from a cache) and compare with the committed "
        "reference: accuracy within a tolerance, bytes and FLOPs exactly. Exit 1 on a regression."))
    p.add_argument("--suite", default=DEFAULT_SUITE, help=f"suite name or path (default {DEFAULT_SUITE})")
    p.add_argument("--reference", default=None, help=f"reference file (default {DEFAULT_REFERENCE} of the "
                                                     "repository, found from any folder inside it)")
    p.add_argument("--update", action="store_true", help="rewrite the reference from this run (deliberately)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="accuracy tolerance in points for methods without their own (default: the "
                        "reference's, else the suite's, else 2)")
    p.add_argument("--out", default=None, help="keep the runs in this folder (default: a temporary one)")
    _common(p)
    args = p.parse_args(argv)
    from mhpfl.benchmark.suite import load_suite

    reference = args.reference or locate_reference(update=args.update)
    suite = load_suite(args.suite, overrides=_overrides(args))
    return run_check(suite, reference, update=args.update, tolerance=args.tolerance, jobs=args.jobs,
                     threads=args.threads, out=args.out, progress=not args.quiet)


COMMANDS = {"bench": cmd_bench, "report": cmd_report, "check": cmd_check}
