"""Seconds per round of the paper's protocol (the `paper` suite: CIFAR, evaluation every round),
measured on this machine, and the projected cost of 500-round runs. Run by hand, not by pytest:

    OMP_NUM_THREADS=1 python benchmarks/paper_cost.py --methods standalone pfedlora --rounds 2

Round 1 holds the set-up of its participants (their first participation), so rounds 2..R are timed
(median); R is at least what gives every client one participation (10 at (100, 10%)), so later
rounds still hold some clients' set-up, as in a real run's first rounds.
Where a dataset the chosen settings use is not under --data-root, a stand-in of its shape and
size (CIFAR-10 and CIFAR-100: 50,000 + 10,000 random 3x32x32 images, balanced labels;
Fashion-MNIST: 60,000 + 10,000 of 28x28) is written to a temporary folder: the time of a round
does not depend on pixel values. The output says which data was used.

On a GPU (`--device cuda`), one command measures what docs/performance.md's GPU section asks for:
fp32 and bf16, one client at a time and batched, the quick N10 and the paper's CIFAR-10 N10
settings, with the GPU's utilisation sampled by nvidia-smi during each run:

    python benchmarks/paper_cost.py --device cuda --suite paper --settings cifar10-N10-C100 \
        --methods standalone pfedlora --precision fp32 bf16 --batch-clients off on
    python benchmarks/paper_cost.py --device cuda --suite quick --precision fp32 bf16 --batch-clients off on

`--copies K` runs K copies of each measurement at once, each in its own process (spawned, with
1/K of the torch threads): the throughput when K runs share the device, as `--run-gpus 1/K` (Ray)
or `--jobs K` make them. A row's `s_per_round` is then the copies' mean, and the device-seconds
a round costs is `s_per_round / copies`.

`hours_in_suite` is the measured device-seconds per round x the rounds of every run of that
(setting, method) in the suite (seeds and ablation values): the projected device-hours of that
part of the suite. `projection` sums them per (precision, batching, copies) over the rows
measured, with the share of the suite's runs they cover: `--settings all --methods all` projects
the whole suite (benchmarks/suite_hours.py prices the runs not measured from those that were).
The output file is rewritten after every measurement, so a run stopped early keeps what it
measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import pickle
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def stand_in_cifar10(root: Path) -> None:
    """CIFAR-10's extracted folder in torchvision's layout, random images, the real sizes."""
    _stand_in_cifar(root / "cifar-10-batches-py", [*[(f"data_batch_{i}", 10_000) for i in range(1, 6)],
                                                   ("test_batch", 10_000)], "labels", 10,
                    ("batches.meta", "label_names"))


def stand_in_cifar100(root: Path) -> None:
    """CIFAR-100's extracted folder in torchvision's layout, random images, the real sizes."""
    _stand_in_cifar(root / "cifar-100-python", [("train", 50_000), ("test", 10_000)], "fine_labels", 100,
                    ("meta", "fine_label_names"))


def _stand_in_cifar(folder: Path, files: list, label_key: str, classes: int, meta: tuple) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in files:
        blob = {"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
                label_key: rng.permutation(np.arange(n) % classes).tolist()}
        (folder / name).write_bytes(pickle.dumps(blob))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(classes)]}))


def stand_in_fmnist(root: Path) -> None:
    """Fashion-MNIST's four IDX files where torchvision looks for them, random images, the real
    sizes (60,000 + 10,000 of 28x28, balanced labels)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())


class GpuUtilisation:
    """Mean GPU utilisation (percent) sampled by nvidia-smi every 100 ms while the block runs;
    None without nvidia-smi (CPU runs, or a GPU without it)."""

    def __enter__(self):
        import shutil
        import subprocess

        self.samples: list[float] = []
        exe = shutil.which("nvidia-smi")
        self.proc = None if exe is None else subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]  # "[N/A]" skipped

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


STAND_INS = {"cifar10": ("CIFAR-10", stand_in_cifar10), "cifar100": ("CIFAR-100", stand_in_cifar100),
             "fmnist": ("Fashion-MNIST", stand_in_fmnist)}


def trust_stand_ins(tmp: str) -> None:
    """torchvision's CIFAR loader skips its MD5 check for files under `tmp` (a stand-in has no
    MD5); real files, linked in from elsewhere, keep their check."""
    import torchvision.datasets.cifar as cifar

    real_check, ours = cifar.check_integrity, os.path.realpath(tmp) + os.sep

    def check_integrity(fpath, md5=None):
        return os.path.isfile(fpath) if os.path.realpath(fpath).startswith(ours) else real_check(fpath, md5)

    cifar.check_integrity = check_integrity


def data_with_stand_ins(names: list[str], root: str | None, tmp: str) -> tuple[str | None, str]:
    """The data root to run on and what it holds: `root` where every dataset in `names` is there,
    else `tmp` holding a random stand-in of the same shape and size for each absent one and a link
    to each present one's files under `root`."""
    from mhpfl.datasets.loaders import dataset_present, default_data_root

    absent = [n for n in names if not dataset_present(n, root)]
    if not absent:
        return root, "; ".join(STAND_INS[n][0] for n in names)
    src = Path(root) if root else default_data_root()
    for entry in ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar-100-python", "cifar-100-python.tar.gz",
                  "FashionMNIST"):
        if (src / entry).exists():
            (Path(tmp) / entry).symlink_to((src / entry).resolve())
    if {"cifar10", "cifar100"} & set(absent):
        trust_stand_ins(tmp)
    for n in absent:
        STAND_INS[n][1](Path(tmp))
    return tmp, "; ".join(f"{STAND_INS[n][0]}-shaped random stand-in (real data absent)" if n in absent
                          else STAND_INS[n][0] for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="paper", choices=["paper", "quick"])
    ap.add_argument("--methods", nargs="+", default=["standalone", "pfedlora"], help="or: all (the suite's)")
    ap.add_argument("--settings", nargs="+", default=None,
                    help="default: the paper suite's CIFAR-10 settings, or every setting of quick; all: every one")
    ap.add_argument("--skip-settings", nargs="+", default=[], help="settings left out (of --settings all, say)")
    ap.add_argument("--standalone-first", action="store_true",
                    help="measure Standalone in every setting before the other methods (a run cut short by a "
                         "time limit then still has every setting's reference cost)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per measurement (>= 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--batch-clients", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--copies", nargs="+", type=int, default=[1], help="runs at once on the device (K >= 1)")
    ap.add_argument("--data-root", default=os.environ.get("MHPFL_DATA"))
    ap.add_argument("--out", default="paper_cost.json", help="rewritten after every measurement")
    a = ap.parse_args()

    from mhpfl.benchmark.suite import load_suite

    if min(a.copies) < 1:
        raise SystemExit(f"error: --copies {min(a.copies)}: give how many runs share the device, 1 or more")
    suite = load_suite(a.suite)
    if a.settings == ["all"]:
        settings = [s.name for s in suite.settings]
    else:
        settings = a.settings or ([s.name for s in suite.settings if s.cfg.dataset == "cifar10"]
                                  if a.suite == "paper" else [s.name for s in suite.settings])
    methods = suite.methods if a.methods == ["all"] else a.methods
    check_names(suite, settings + a.skip_settings, methods)
    settings = [s for s in settings if s not in a.skip_settings]
    tmp = tempfile.TemporaryDirectory()
    suite, root, data = suite_on_data(a.suite, settings, a.data_root, a.device, tmp.name)
    stand_ins = root if root == tmp.name else None  # where the copies must trust stand-ins
    gpu_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else None
    report = {"device": a.device, "gpu": gpu_name, "torch_threads": torch.get_num_threads(),
              "cpu": platform.processor(), "data": data, "suite": a.suite, "rows": []}
    rows = report["rows"]
    for e in measured_entries(suite, settings, methods, a.standalone_first):
        k = max(1, round(e.cfg.frac * e.cfg.clients))  # participants per round; each client once at least
        rounds = max(a.rounds, -(-e.cfg.clients // k))
        in_suite = [x for x in suite.runs().values() if x.setting == e.setting and x.method == e.method]
        for precision, batching, copies in itertools.product(a.precision, a.batch_clients, a.copies):
            cfg = dataclasses.replace(e.cfg, rounds=rounds, eval_every=1, precision=precision,
                                      batch_clients=batching == "on")
            with GpuUtilisation() as gpu:
                if copies == 1:
                    times = [measure(cfg)]
                else:
                    threads = max(1, torch.get_num_threads() // copies)
                    spawn = multiprocessing.get_context("spawn")
                    with ProcessPoolExecutor(copies, mp_context=spawn) as pool:
                        times = list(pool.map(measure, [cfg] * copies, [stand_ins] * copies, [threads] * copies))
            per_round = statistics.mean(t[0] for t in times)
            device_s = per_round / copies  # what a round costs the device when `copies` runs share it
            rows.append({"setting": e.setting, "method": e.method, "precision": precision,
                         "batch_clients": batching, "copies": copies, "s_per_round": round(per_round, 2),
                         "s_per_round_copies": [round(t[0], 2) for t in times] if copies > 1 else None,
                         "gpu_util_pct": gpu.mean,
                         "hours_per_run": round(device_s * e.cfg.rounds / 3600, 2),
                         "rounds_in_run": e.cfg.rounds, "runs_in_suite": len(in_suite),
                         "rounds_in_suite": sum(x.cfg.rounds for x in in_suite),
                         "hours_in_suite": round(device_s * sum(x.cfg.rounds for x in in_suite) / 3600, 2),
                         "measured_rounds": rounds, "wall_s": round(max(t[1] for t in times), 1),
                         "train_flops_per_round": times[0][2] / rounds})
            print(rows[-1], flush=True)
            report["projection"] = projection(rows, len(suite.runs()))
            Path(a.out).write_text(json.dumps(report, indent=1))  # a run stopped early keeps its rows
    print(pd.DataFrame(rows).to_markdown(index=False))
    for p in report.get("projection", []):
        print(f"{p['precision']}, batch-clients {p['batch_clients']}, {p['copies']} at once: {p['hours']} "
              f"device-hours for the {p['runs']} of the suite's {p['runs_in_suite']} runs whose (setting, "
              "method) was measured")
    print(f"data: {data}; device {a.device}{f' ({gpu_name})' if gpu_name else ''}; "
          f"{torch.get_num_threads()} torch thread(s); written {a.out}")


def check_names(suite, settings: list[str], methods: list[str]) -> None:
    """A one-line error naming every setting or method that is not in `suite`."""
    unknown = sorted(set(settings) - {s.name for s in suite.settings}) + sorted(set(methods) - set(suite.methods))
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)}: not in the {suite.name} suite; its settings are "
                         f"{', '.join(s.name for s in suite.settings)} and its methods {', '.join(suite.methods)}")


def suite_on_data(name: str, settings: list[str], data_root: str | None, device: str, tmp: str):
    """The suite `name` set to run on `device` from the data its `settings` need (stand-ins in
    `tmp` for what is absent, see data_with_stand_ins): (suite, data root, what the data are)."""
    from mhpfl.benchmark.suite import load_suite

    datasets = sorted({s.cfg.dataset for s in load_suite(name).settings if s.name in settings})
    root, data = data_with_stand_ins(datasets, data_root, tmp)
    return load_suite(name, overrides={"data_root": root, "download": False, "device": device}), root, data


def measure(cfg, stand_in_root: str | None = None, threads: int | None = None) -> tuple[float, float, float]:
    """One run of `cfg`: the median s/round of rounds 2..R, the wall seconds, the training FLOPs.
    A spawned copy (--copies) passes the folder its stand-ins are in and its torch threads."""
    from mhpfl.engine import run

    if stand_in_root is not None:
        trust_stand_ins(stand_in_root)
    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        s = run(cfg, out=out, progress=False)
        wall = time.perf_counter() - t0
        rows = pd.read_csv(Path(out) / "rounds.csv")
    return statistics.median(rows[rows["round"] >= 2]["wall_seconds"]), wall, s["train_flops"]


def measured_entries(suite, settings: list[str], methods: list[str], standalone_first: bool = False) -> list:
    """The suite's main runs of its first seed in `settings` x `methods`, in the suite's order, or
    with every Standalone run first (the suite's order otherwise)."""
    entries = [e for e in suite.entries if e.group == "main" and e.seed == suite.entries[0].seed
               and e.setting in settings and e.method in methods]
    return sorted(entries, key=lambda e: e.method != "standalone") if standalone_first else entries


def projection(rows: list[dict], runs_in_suite: int) -> list[dict]:
    """Per (precision, batching, copies): the device-hours of every suite run whose (setting,
    method) was measured (each run's rounds x its measured s/round / the copies sharing the
    device), and how many runs that covers."""
    out = {}
    for r in rows:
        copies = r.get("copies", 1)
        p = out.setdefault((r["precision"], r["batch_clients"], copies),
                           {"precision": r["precision"], "batch_clients": r["batch_clients"], "copies": copies,
                            "seconds": 0.0, "runs": 0, "runs_in_suite": runs_in_suite})
        p["seconds"] += r["s_per_round"] / copies * r["rounds_in_suite"]
        p["runs"] += r["runs_in_suite"]
    for p in out.values():
        p["hours"] = round(p.pop("seconds") / 3600, 2)
    return list(out.values())


if __name__ == "__main__":
    main()
