"""The `mhpfl` command line. User errors print one line and exit 2; never a traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mhpfl.errors import UserError

RUN_FLAGS = [
    # flag, RunConfig field, type, help
    ("--dataset", "dataset", str, "fmnist | cifar10 | cifar100"),
    ("--clients", "clients", int, "number of clients N"),
    ("--frac", "frac", float, "fraction C of clients sampled per round, in (0, 1]"),
    ("--rounds", "rounds", int, "communication rounds T (the paper: 500)"),
    ("--local-epochs", "local_epochs", int, "local epochs E per round (the paper: 1 or 10)"),
    ("--batch-size", "batch_size", int, "local batch size"),
    ("--lr", "lr", float, "SGD learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--grad-clip", "grad_clip", float, "gradient-norm clipping (0: off)"),
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
    ("--eval-every", "eval_every", int, "evaluate all clients every R rounds (and at the end)"),
    ("--data-root", "data_root", str, "dataset directory (default $MHPFL_DATA or ~/.cache/mhpfl)"),
]


def _method_options_group(parser: argparse.ArgumentParser, method_cls) -> None:
    if not method_cls.options:
        return
    g = parser.add_argument_group(f"{method_cls.name} options")
    for name, opt in method_cls.options.items():
        extra = {"choices": opt.choices} if opt.choices else {}
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", metavar=type(opt.default).__name__.upper(),
                       type=_opt_parser(name, opt), default=None,
                       help=f"{opt.help} (default: {opt.default})", **extra)


def _opt_parser(name, opt):
    def parse(text):
        try:
            return opt.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {e}") from None
    return parse


def _run_parser(method_cls=None) -> argparse.ArgumentParser:
    from mhpfl.config import RunConfig

    defaults = RunConfig(method="-")
    p = argparse.ArgumentParser(prog="mhpfl run", description="Run one federated experiment.")
    p.add_argument("method", help="method name (see 'mhpfl list')")
    for flag, field, typ, help_ in RUN_FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None,
                       help=f"{help_} (default: {getattr(defaults, field)})")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="turn off training augmentation (on by default for CIFAR)")
    p.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download datasets; fail if they are absent")
    p.add_argument("--out", default=None, help="output directory (default runs/METHOD-DATASET-N-seedS)")
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


def cmd_run(argv: list[str]) -> int:
    from mhpfl.config import RunConfig
    from mhpfl.engine import run
    from mhpfl.methods import get_method

    first = [a for a in argv if not a.startswith("-")]
    method_cls = get_method(first[0]) if first else None
    args = _run_parser(method_cls).parse_args(argv)
    fields = {f: getattr(args, f) for _, f, _, _ in RUN_FLAGS if getattr(args, f) is not None}
    for f in ("augment", "download"):
        if getattr(args, f) is not None:
            fields[f] = getattr(args, f)
    opts = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    cfg = RunConfig(method=args.method, method_options=opts, **fields)
    out = args.out or f"runs/{cfg.method}-{cfg.dataset}-N{cfg.clients}-seed{cfg.seed}"
    if args.flower_app and args.engine != "flower":
        raise UserError("--flower-app needs --engine flower")
    if args.engine == "flower":
        from mhpfl import flower

        if args.flower_app:
            app = flower.write_app(cfg, args.flower_app, out)
            print(f"wrote the Flower App {app}/pyproject.toml; with a SuperLink and SuperNodes running, submit it "
                  f"with: flwr run {app} CONNECTION --stream   (results go to {Path(out).resolve()})")
            return 0
        summary = flower.run_flower(cfg, out=out, progress=not args.quiet)
    else:
        summary = run(cfg, out=out, progress=not args.quiet)
    print(f"{summary['method']}: best mean acc {summary['best_mean_acc']:.2f}%  "
          f"final {summary['final_mean_acc']:.2f}%  bytes up {summary['bytes_up']:,}  "
          f"down {summary['bytes_down']:,}  train FLOPs {summary['train_flops']:.3e}  -> {out}")
    return 0


def cmd_list(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="mhpfl list", description="List methods, datasets and zoos.").parse_args(argv)
    from mhpfl.datasets import DATASETS
    from mhpfl.methods import available_methods
    from mhpfl.models import ZOOS

    print("methods:")
    for name, cls in available_methods().items():
        desc = cls.description if isinstance(cls, type) else f"BROKEN PLUGIN: {cls}"
        print(f"  {name:<12} {desc}")
    print("datasets:")
    for name, info in DATASETS.items():
        print(f"  {name:<12} {info.num_classes} classes, input {'x'.join(map(str, info.in_shape))}")
    print("model zoos:")
    for name, desc in ZOOS.items():
        print(f"  {name:<12} {desc}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mhpfl compare", description="Table of finished runs.")
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json)")
    args = p.parse_args(argv)
    import pandas as pd

    rows = []
    for d in args.runs:
        f = Path(d) / "summary.json"
        if not f.is_file():
            raise UserError(f"{f} not found: run 'mhpfl run ... --out {d}' first")
        s = json.loads(f.read_text())
        r = max(s["rounds_run"], 1)
        rows.append({"method": s["method"], "engine": s.get("engine", "inprocess"), "best acc %": round(s["best_mean_acc"], 2),
                     "final acc %": round(s["final_mean_acc"], 2),
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
              "  bench SUITE          run a benchmark suite (smoke, quick, paper or a .toml), cached\n"
              "  report DIR           tables and plots of a bench folder\n"
              "  check                regression check against results/smoke/reference.json")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished results are kept on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
