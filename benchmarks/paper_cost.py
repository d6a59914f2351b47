"""Seconds per round of the paper's protocol (the `paper` suite: CIFAR, evaluation every round),
measured on this machine, and the projected cost of 500-round runs. Run by hand, not by pytest:

    OMP_NUM_THREADS=1 python benchmarks/paper_cost.py --methods standalone pfedlora --rounds 2

Round 1 holds the set-up of its participants (their first participation), so rounds 2..R are timed
(median); R is at least what gives every client one participation (10 at (100, 10%)), so later
rounds still hold some clients' set-up, as in a real run's first rounds.
Where the real CIFAR-10 archive is not under --data-root, a CIFAR-10-shaped stand-in of the same
size (50,000 + 10,000 random 3x32x32 images, balanced labels) is written to a temporary folder:
the time of a round does not depend on pixel values. The output says which data was used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def stand_in_cifar10(root: Path) -> None:
    """CIFAR-10's extracted folder in torchvision's layout, random images, the real sizes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 10_000) for i in range(1, 6)], ("test_batch", 10_000)]:
        blob = {"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
                "labels": rng.permutation(np.arange(n) % 10).tolist()}
        (folder / name).write_bytes(pickle.dumps(blob))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["standalone", "pfedlora"])
    ap.add_argument("--settings", nargs="+", default=["cifar10-N10-C100", "cifar10-N50-C20", "cifar10-N100-C10"])
    ap.add_argument("--rounds", type=int, default=2, help="rounds per measurement (>= 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=os.environ.get("MHPFL_DATA"))
    ap.add_argument("--out", default="paper_cost.json")
    a = ap.parse_args()

    from mhpfl.benchmark.suite import load_suite
    from mhpfl.datasets.loaders import dataset_present
    from mhpfl.engine import run

    tmp = tempfile.TemporaryDirectory()
    root, data = a.data_root, "CIFAR-10"
    if root is None or not dataset_present("cifar10", root):
        import torchvision.datasets.cifar as cifar

        root, data = tmp.name, "CIFAR-10-shaped random stand-in (real archive absent)"
        stand_in_cifar10(Path(root))
        cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)  # the stand-in has no MD5
    suite = load_suite("paper", overrides={"data_root": root, "download": False, "device": a.device})
    rows = []
    for e in suite.entries:
        if e.group != "main" or e.seed != suite.entries[0].seed or e.setting not in a.settings \
                or e.method not in a.methods:
            continue
        k = max(1, round(e.cfg.frac * e.cfg.clients))  # participants per round; each client once at least
        rounds = max(a.rounds, -(-e.cfg.clients // k))
        cfg = dataclasses.replace(e.cfg, rounds=rounds, eval_every=1)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            s = run(cfg, out=out, progress=False)
            wall = time.perf_counter() - t0
            rows_csv = pd.read_csv(Path(out) / "rounds.csv")
        per_round = statistics.median(rows_csv[rows_csv["round"] >= 2]["wall_seconds"])
        rows.append({"setting": e.setting, "method": e.method, "s_per_round": round(per_round, 2),
                     "hours_per_run": round(per_round * e.cfg.rounds / 3600, 2), "rounds_in_run": e.cfg.rounds,
                     "measured_rounds": rounds, "wall_s": round(wall, 1),
                     "train_flops_per_round": s["train_flops"] / rounds})
        print(rows[-1], flush=True)
    report = {"device": a.device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor(),
              "data": data, "rows": rows}
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f"data: {data}; device {a.device}; {torch.get_num_threads()} torch thread(s); written {a.out}")


if __name__ == "__main__":
    main()
