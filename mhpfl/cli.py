"""The `mhpfl` command line. User errors print one line and exit 2; never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from mhpfl.errors import ArgumentParser, Interrupted, UserError, did_you_mean
from mhpfl.results import SELECTED_ON_VALIDATION

RUN_FLAGS = [
    # flag, RunConfig field, type, help
    ("--dataset", "dataset", str, "fmnist | mnist | kmnist | cifar10 | cifar100 (see mhpfl list)"),
    ("--clients", "clients", int, "number of clients N; with --partition pathological:K, N*K must be "
                                  "divisible by the number of classes (10, or 100 on cifar100)"),
    ("--frac", "frac", float, "fraction C of clients sampled per round, in (0, 1]"),
    ("--rounds", "rounds", int, "communication rounds T (the paper: 500)"),
    ("--local-epochs", "local_epochs", int, "local epochs E per round (the paper: 1 or 10)"),
    ("--batch-size", "batch_size", int, "local batch size"),
    ("--lr", "lr", float, "SGD learning rate, > 0"),
    ("--momentum", "momentum", float, "SGD momentum, in [0, 1)"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay, >= 0"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clipping, >= 0 (0: off)"),
    ("--partition", "partition", str, "pathological:K or dirichlet:ALPHA (default: pathological:2, "
                                      "pathological:10 on cifar100)"),
    ("--zoo", "zoo", str, "hetero (client i: CNN-((i mod 5)+1)) | homo (all CNN-1)"),
    ("--train-fraction", "train_fraction", float, "seeded fraction of each client's training data kept"),
    ("--val-size", "val_size", int, "training samples held out (validation + public pool)"),
    ("--public-size", "public_size", int, "size of the public pool no client owns (FedMD)"),
    ("--public", "public", str, "public pool: heldout (a slice held out of the training pool) or a "
                                "dataset name with the same input shape (e.g. cifar10 for cifar100)"),
    ("--seed", "seed", int, "seed of everything random"),
    ("--device", "device", str, "cpu | cuda"),
    ("--precision", "precision", str, "fp32 | bf16 (bf16: autocast of forward passes, fp32 weights; "
                                      "recorded in the summary)"),
    ("--eval-every", "eval_every", int, "evaluate all clients every R rounds (and at the end)"),
    ("--test-eval", "test_eval", str, "every: the test split at every evaluated round; improved: only at "
                                      "rounds that improve the mean validation accuracy and at the last (same "
                                      "selected and final accuracy, cheaper, no best-on-test view)"),
    ("--data-root", "data_root", str, "dataset directory (default $MHPFL_DATA or ~/.cache/mhpfl)"),
]


def _method_options_group(parser: argparse.ArgumentParser, method_cls) -> None:
    if not method_cls.options:
        return
    g = parser.add_argument_group(f"{method_cls.name} options")
    for name, opt in method_cls.options.items():
        extra = {"choices": opt.choices} if opt.choices else {}
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", metavar=type(opt.default).__name__.upper(),
                       type=_opt_parser(opt), default=None,
                       help=f"{opt.help} (default: {opt.default}"
                            + (f"; in {opt.interval})" if opt.interval else ")"), **extra)


def _opt_parser(opt):
    def parse(text):
        try:
            return opt.parse(text)
        except ValueError as e:  # argparse names the option; say what was wrong, as for its own types
            number = opt.type is None and type(opt.default) in (int, float)
            raise argparse.ArgumentTypeError(f"invalid {type(opt.default).__name__} value: {text!r}" if number
                                             else str(e)) from None
    return parse


def _run_parser(method_cls=None) -> argparse.ArgumentParser:
    from mhpfl.config import RunConfig

    defaults = RunConfig(method="-")
    p = ArgumentParser(prog="mhpfl run", description="Run one federated experiment.",
                       see=f"mhpfl run {method_cls.name if method_cls else 'METHOD'} --help")
    p.add_argument("method", help="method name (see 'mhpfl list')")
    for flag, field, typ, help_ in RUN_FLAGS:
        default = "" if "default" in help_ else f" (default: {getattr(defaults, field)})"
        p.add_argument(flag, dest=field, type=typ, default=None, help=help_ + default)
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="turn off training augmentation (on by default for CIFAR)")
    p.add_argument("--batch-clients", dest="batch_clients", action=argparse.BooleanOptionalAction, default=None,
                   help="train the participants that share an architecture and a loss as one batched (vmapped) "
                        "computation; same results up to float rounding (default: off; measured slower on CPU, "
                        "see docs/performance.md)")
    p.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download datasets; fail if they are absent")
    p.add_argument("--out", default=None, help="output directory (default runs/METHOD-DATASET-N{N}-seed{S}-HASH, "
                                               "HASH naming the full configuration)")
    p.add_argument("--force", action="store_true",
                   help="run again although --out holds a finished run of this configuration")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run of another configuration in --out (kept until the new one finishes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                   help="inprocess (default): every client in this process; flower: the same method as a "
                        "Flower app (Message API) in Flower's simulation runtime (pip install 'mhpfl-bench[flower]')")
    p.add_argument("--flower-app", metavar="DIR", default=None,
                   help="with --engine flower: write a Flower App for a real federation into DIR instead of "
                        "simulating (then: flwr run DIR CONNECTION; see docs/scale-out.md)")
    if method_cls is not None:
        _method_options_group(p, method_cls)
    return p


def _method_meta(name: str):
    """The method's options and description for the command line: from the start-up catalog for
    a built-in method (no torch import), else its class."""
    from mhpfl.catalog import method_info
    from mhpfl.methods import get_method

    return method_info(name) or get_method(name)


def _how_selected(summary: dict) -> str:
    """How a run's reported round was chosen: "best on validation", or the summary's reason it was
    not (the final round, without validation data)."""
    sel = summary.get("selection", SELECTED_ON_VALIDATION)
    return "best on validation" if sel == SELECTED_ON_VALIDATION else sel


def _verdict(summary: dict) -> str:
    """"converged", "not converged", or "not judged" (no validation data, or too few evaluated rounds)."""
    if summary["converged"]:
        return "converged"
    return "not judged" if "reason" in (summary.get("convergence") or {}) else "not converged"


def _result_line(summary: dict, out) -> str:
    """One line per finished run: the selected accuracy, how its round was chosen, the verdict."""
    v = _verdict(summary)
    verdict = {"converged": "", "not judged": "; convergence not judged"}.get(v, f"; {v}")
    return (f"{summary['method']}: acc {summary['selected_mean_acc']:.2f}% (round {summary['selected_round']}, "
            f"{_how_selected(summary)}{verdict})  "
            f"best on test {_pct(summary['best_mean_acc'])}  "
            f"final {summary['final_mean_acc']:.2f}%  bytes up {summary['bytes_up']:,}  "
            f"down {summary['bytes_down']:,}  train FLOPs {summary['train_flops']:.3e}  -> {out}")


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def _same_run(summary: dict, cfg, key: str) -> tuple[bool, str]:
    """Whether a finished summary is a run of `cfg` (same run key: settings, resolved method
    options, method and package version); else which settings differ."""
    from mhpfl.benchmark.suite import run_key
    from mhpfl.config import RunConfig
    from mhpfl.methods import get_method

    old = dict(summary["config"])
    old.pop("versions", None)
    try:
        same = (run_key(RunConfig.from_dict(old)) == key
                and str(summary.get("method_version")) == str(get_method(cfg.method).version))
    except UserError:
        same = False
    if same:
        return True, ""
    hp = get_method(cfg.method)(**cfg.method_options).hp
    a, b = _flat_settings(old), _flat_settings({**cfg.to_dict(), "method_options": hp})
    diff = [f"{k} {a.get(k)} -> {b.get(k)}" for k in dict.fromkeys([*a, *b])
            if k not in ("--data-root", "--download", "--device", "--batch-clients") and a.get(k) != b.get(k)]
    if summary["method"] != cfg.method:
        diff.insert(0, f"method {summary['method']} -> {cfg.method}")
    return False, ", ".join(diff) or "method or code version"


def cmd_run(argv: list[str]) -> int:
    from mhpfl.config import RunConfig

    first = [a for a in argv if not a.startswith("-")]
    meta = _method_meta(first[0]) if first else None
    args = _run_parser(meta).parse_args(argv)
    fields = {f: getattr(args, f) for _, f, _, _ in RUN_FLAGS if getattr(args, f) is not None}
    for f in ("augment", "download", "batch_clients"):
        if getattr(args, f) is not None:
            fields[f] = getattr(args, f)
    opts = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    cfg = RunConfig(method=args.method, method_options=opts, **fields)
    if args.flower_app and args.engine != "flower":
        raise UserError("--flower-app needs --engine flower")
    cfg.validate()  # every impossible setting fails here, before any data is loaded

    import os
    import shutil

    from mhpfl.benchmark.suite import run_key
    from mhpfl.results import DamagedResult, load_summary

    key = run_key(cfg)
    engine = "" if args.engine == "inprocess" else f"-{args.engine}"
    out = Path(args.out or f"runs/{cfg.method}-{cfg.dataset}-N{cfg.clients}-seed{cfg.seed}-{key[:8]}{engine}")
    if args.flower_app:
        from mhpfl import flower

        app = flower.write_app(cfg, args.flower_app, str(out))
        print(f"wrote the Flower App {app}/pyproject.toml; submit it with: flwr run {app} CONNECTION --stream "
              f"(CONNECTION: a SuperLink with SuperNodes, or one with address \":local:\" for Flower's own local "
              f"simulation; see docs/scale-out.md); results go to {out.resolve()}")
        return 0
    replace = False
    if (out / "summary.json").exists():
        try:
            old = load_summary(out / "summary.json")
        except DamagedResult as e:
            if not args.overwrite:
                raise UserError(f"{e}; or pass --overwrite to run into {out} anyway") from None
        else:
            same, diff = _same_run(old, cfg, key)
            if same and old.get("engine", "inprocess") != args.engine:
                same, diff = False, f"engine {old.get('engine', 'inprocess')} -> {args.engine}"
            if same and not args.force:
                print(f"already finished (same configuration; --force to run it again): {_result_line(old, out)}")
                return 0
            if not same and not args.overwrite:
                raise UserError(f"{out} holds a finished run of another configuration ({diff}); choose "
                                "another --out (or leave --out out), or pass --overwrite to replace it")
        replace = True

    if args.engine == "flower":
        from mhpfl.flower import run_flower as run
    else:
        from mhpfl.engine import run

    target = out.with_name(f".{out.name}.inflight.{os.getpid()}") if replace else out
    made = not target.exists()  # a folder this attempt makes and leaves empty is removed
    done = False  # a finished new run is never deleted, even where it cannot take the old one's place
    try:
        try:
            summary = run(cfg, out=target, progress=not args.quiet)
        except KeyboardInterrupt as e:
            kept = f"; the finished run in {out} is kept" if replace else ""
            raise Interrupted.of(e, f"the run stopped before its last round (not a result: no summary.json){kept}; "
                                    "rerun the command to train it from the start") from None
        except Exception as e:
            from mhpfl.methods import BUILTIN, get_method

            if isinstance(e, UserError) or cfg.method in BUILTIN:
                raise
            raise UserError(f"method '{cfg.method}' (a plugin: {get_method(cfg.method).__module__}) raised "
                            f"{_one_line(e)} (traceback in {_keep_traceback()}); fix or uninstall the package "
                            "that provides it") from None
        done = True
        if replace:  # the old result goes only once the new one is complete
            trash = out.with_name(f".{out.name}.old.{os.getpid()}")
            try:
                os.replace(out, trash)
            except OSError as e:
                raise UserError(f"the new run is complete in {target}, but {out} cannot be replaced "
                                f"({e.strerror}); move it there yourself, or rerun with another --out") from None
            os.replace(target, out)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if replace and not done:
            shutil.rmtree(target, ignore_errors=True)
        elif made and not done and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    print(_result_line(summary, out))
    return 0


def cmd_list(argv: list[str]) -> int:
    ArgumentParser(prog="mhpfl list", description="List methods, datasets and zoos.").parse_args(argv)
    from mhpfl import catalog
    from mhpfl.methods import BUILTIN, available_methods

    print("methods:")
    infos = {n: catalog.method_info(n) for n in BUILTIN}
    # fast path: with a current catalog no built-in method module (nor torch) is imported
    methods = available_methods(infos if all(infos.values()) else None)
    for name, cls in methods.items():
        desc = f"BROKEN PLUGIN: {cls}" if isinstance(cls, UserError) else cls.description
        print(f"  {name:<12} {desc}")
    print("datasets:")
    datasets = catalog.datasets()
    if datasets is None:
        from mhpfl.datasets import DATASETS

        datasets = list(DATASETS.values())
    for info in datasets:
        print(f"  {info.name:<12} {info.num_classes} classes, input {'x'.join(map(str, info.in_shape))}")
    print("model zoos:")
    zoos = catalog.zoos()
    if zoos is None:
        from mhpfl.models import ZOOS as zoos
    for name, desc in zoos.items():
        print(f"  {name:<12} {desc}")
    return 0


def _flat_settings(cfg: dict) -> dict:
    """A run's settings as flag -> value (method options as --option), for the compare table."""
    out = {}
    for k, v in cfg.items():
        if k in ("method", "versions", "method_options"):
            continue
        out[f"--{k.replace('_', '-')}"] = v
    for k, v in (cfg.get("method_options") or {}).items():
        out[f"--{k.replace('_', '-')}"] = v
    return out


def cmd_compare(argv: list[str]) -> int:
    p = ArgumentParser(prog="mhpfl compare", description=(
        "Table of finished runs: one row per run folder, with its seed and every setting that "
        "differs between the runs."))
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json)")
    args = p.parse_args(argv)
    from mhpfl.results import load_summary

    summaries = [load_summary(Path(d) / "summary.json") for d in args.runs]
    import pandas as pd

    flat = [_flat_settings(s["config"]) for s in summaries]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    # a setting differs if the runs that have it disagree (a method's own options count only
    # between runs of methods that have them)
    differ = [k for k in keys if k != "--seed"
              and len({json.dumps(f[k], sort_keys=True) for f in flat if k in f}) > 1]
    rows = []
    for d, s, f in zip(args.runs, summaries, flat):
        r = max(s["rounds_run"], 1)
        rows.append({"run": d, "method": s["method"], "seed": f.get("--seed"),
                     **{k: f.get(k, "") for k in differ}, "engine": s.get("engine", "inprocess"),
                     "acc % (selected)": round(s["selected_mean_acc"], 2),
                     "selected": f"round {s['selected_round']}, {_how_selected(s)}",
                     "best acc % (on test)": "n/a" if s["best_mean_acc"] is None else round(s["best_mean_acc"], 2),
                     "final acc %": round(s["final_mean_acc"], 2),
                     "converged": _verdict(s),
                     "bytes up/round": s["bytes_up"] / r, "bytes down/round": s["bytes_down"] / r,
                     "train FLOPs/round": f"{s['train_flops'] / r:.3e}", "wall s": s["wall_seconds"]})
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


COMMANDS = {"run": cmd_run, "list": cmd_list, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        from mhpfl.benchmark import cli as bench_cli  # registers bench/report/check when present

        COMMANDS.update(bench_cli.COMMANDS)
    except ImportError:
        pass
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mhpfl {" + ",".join(COMMANDS) + "} ...\n"
              "  list                 methods, datasets and model zoos\n"
              "  run METHOD [opts]    one federated experiment (mhpfl run METHOD --help)\n"
              "  compare DIR...       table of finished runs\n"
              "  bench SUITE          run a benchmark suite (smoke, quick, full, paper or a .toml), cached\n"
              "  report DIR           tables and plots of a bench folder\n"
              "  check                regression check against results/smoke/reference.json")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'{did_you_mean(argv[0], list(COMMANDS))}", file=sys.stderr)
            return 2
        return 0
    previous = _stop_on_sigterm()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        what = getattr(e, "message", "") or "finished results are kept on disk"
        print(f"error: interrupted by {signal.Signals(signum).name}; {what}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # output piped into a reader that stopped (mhpfl list | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug, ours or a plugin's: one line, the traceback kept for the report
        print(f"error: unexpected {_one_line(e)} (traceback in {_keep_traceback()}); this is a bug in mhpfl "
              "or in a plugin: please report it with that file", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, cut to `limit` characters."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keep_traceback() -> str:
    """Write the exception being handled, with its traceback, to a new file; return its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="mhpfl-", suffix=".traceback.txt")
    with os.fdopen(fd, "w") as f:
        f.write(traceback.format_exc())
    return path


def _stop_on_sigterm():
    """SIGTERM (kill, timeout, a batch scheduler) stops a command the way Ctrl-C does: the work in
    flight is stopped (a bench stops its worker processes too), finished results stay, one line
    says so. Returns the handler it replaced (None off the main thread, where none can be set)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
