"""benchmarks/paper_cost.py, the script that measures s/round and projects a suite's device-hours
(and, on a GPU, what docs/performance.md's GPU section asks for): it must run where it is first
needed, so its CPU path and its CIFAR-10 stand-in are exercised here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paper_cost import data_with_stand_ins, measured_entries, projection, stand_in_cifar10, stand_in_cifar100
from mhpfl.datasets.loaders import dataset_present, load_dataset
from tests.conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fmnist
def test_paper_cost_times_rounds_and_projects_the_suite(tmp_path):
    out = tmp_path / "cost.json"
    data = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_cost.py"), "--suite", "quick",
                        "--methods", "standalone", "--rounds", "2", "--batch-clients", "off", "on",
                        "--data-root", str(data), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["device"], report["gpu"], report["suite"]) == ("cpu", None, "quick")
    # Debian's package counts as present (it is staged into the root), else a stand-in is written
    assert report["data"] == ("Fashion-MNIST" if dataset_present("fmnist", str(data))
                              else "Fashion-MNIST-shaped random stand-in (real data absent)")
    rows = report["rows"]
    assert [(r["method"], r["batch_clients"], r["precision"]) for r in rows] == [
        ("standalone", "off", "fp32"), ("standalone", "on", "fp32")]
    for r in rows:
        assert r["setting"] == "N10-C100" and r["measured_rounds"] == 2 and r["gpu_util_pct"] is None
        assert (r["rounds_in_run"], r["runs_in_suite"]) == (80, 3)  # the quick suite: 80 rounds, 3 seeds
        assert 0 < r["s_per_round"] < r["wall_s"]
        assert r["hours_in_suite"] == pytest.approx(r["s_per_round"] * 80 * 3 / 3600, abs=0.01)
        assert r["hours_per_run"] == pytest.approx(r["s_per_round"] * 80 / 3600, abs=0.01)
    # batching changes how the work is scheduled, never how much is counted
    assert rows[0]["train_flops_per_round"] == rows[1]["train_flops_per_round"] > 0
    # the suite's device-hours over the rows measured: Standalone's 3 of quick's 30 runs, per batching
    assert [(x["batch_clients"], x["runs"], x["runs_in_suite"]) for x in report["projection"]] == [
        ("off", 3, 30), ("on", 3, 30)]
    for x, r in zip(report["projection"], rows):
        assert x["hours"] == pytest.approx(r["s_per_round"] * 240 / 3600, abs=0.01)
    assert "| standalone" in p.stdout and "device cpu" in p.stdout


def test_cifar10_stand_in_is_read_as_cifar10(tmp_path, monkeypatch):
    """The stand-in the script writes where CIFAR-10 is absent (a GPU machine without internet)
    has CIFAR-10's layout and sizes, so torchvision's loader and the engine read it."""
    import torchvision.datasets.cifar as cifar

    stand_in_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    assert dataset_present("cifar10", str(tmp_path))
    ds = load_dataset("cifar10", str(tmp_path), download=False)
    assert tuple(ds.train_x.shape) == (50_000, 3, 32, 32) and tuple(ds.test_x.shape) == (10_000, 3, 32, 32)
    assert sorted(ds.train_y.bincount().tolist()) == [5_000] * 10  # balanced labels, like CIFAR-10
    assert sorted(ds.test_y.bincount().tolist()) == [1_000] * 10


def test_cifar100_stand_in_is_read_as_cifar100(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    stand_in_cifar100(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    assert dataset_present("cifar100", str(tmp_path))
    ds = load_dataset("cifar100", str(tmp_path), download=False)
    assert tuple(ds.train_x.shape) == (50_000, 3, 32, 32) and tuple(ds.test_x.shape) == (10_000, 3, 32, 32)
    assert sorted(ds.train_y.bincount().tolist()) == [500] * 100


def test_stand_ins_are_written_only_for_the_absent_datasets(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", cifar.check_integrity)  # put back after the test
    real = tmp_path / "real"
    stand_in_cifar10(real)  # stands for a real CIFAR-10 under --data-root
    root, data = data_with_stand_ins(["cifar10"], str(real), str(tmp_path / "unused"))
    assert (root, data) == (str(real), "CIFAR-10")
    (tmp_path / "tmp").mkdir()
    root, data = data_with_stand_ins(["cifar10", "cifar100"], str(real), str(tmp_path / "tmp"))
    assert root == str(tmp_path / "tmp")
    assert data == "CIFAR-10; CIFAR-100-shaped random stand-in (real data absent)"
    assert (tmp_path / "tmp" / "cifar-10-batches-py").resolve() == (real / "cifar-10-batches-py").resolve()
    assert dataset_present("cifar100", root) and dataset_present("cifar10", root)
    # only the stand-in written here skips the MD5 check: a real file (linked in) keeps it
    batch = "cifar-10-batches-py/data_batch_1"
    assert cifar.check_integrity(str(tmp_path / "tmp" / "cifar-100-python" / "train"), "0" * 32)
    assert not cifar.check_integrity(str(tmp_path / "tmp" / batch), "0" * 32)
    assert not cifar.check_integrity(str(real / batch), "0" * 32)


def test_projection_adds_up_the_suite_runs_measured():
    def row(p, s, runs, copies=1):
        return {"precision": p, "batch_clients": "off", "s_per_round": s, "rounds_in_suite": 500 * runs,
                "runs_in_suite": runs, "copies": copies}

    got = projection([row("fp32", 2.0, 3), row("fp32", 4.5, 6), row("bf16", 1.0, 3), row("fp32", 3.0, 3, 4)], 264)
    assert got == [{"precision": "fp32", "batch_clients": "off", "copies": 1, "runs": 9, "runs_in_suite": 264,
                    "hours": round((2.0 * 1500 + 4.5 * 3000) / 3600, 2)},
                   {"precision": "bf16", "batch_clients": "off", "copies": 1, "runs": 3, "runs_in_suite": 264,
                    "hours": round(1500 / 3600, 2)},
                   # four runs shared the device, each at 3 s/round: a round costs it 0.75 s
                   {"precision": "fp32", "batch_clients": "off", "copies": 4, "runs": 3, "runs_in_suite": 264,
                    "hours": round(0.75 * 1500 / 3600, 2)}]


@needs_fmnist
def test_copies_share_the_device_and_cost_it_a_share_of_their_round(tmp_path):
    """--copies 2: two runs of the measurement at once, each in its own spawned process on one of
    the two torch threads; the row keeps each copy's s/round, and the device-hours divide by 2."""
    out = tmp_path / "cost.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_cost.py"), "--suite", "quick",
                        "--methods", "standalone", "--rounds", "2", "--copies", "2",
                        "--data-root", str(tmp_path / "data"), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())["rows"]
    assert r["copies"] == 2 and len(r["s_per_round_copies"]) == 2 and min(r["s_per_round_copies"]) > 0
    assert r["s_per_round"] == pytest.approx(sum(r["s_per_round_copies"]) / 2, abs=0.01)
    assert r["hours_in_suite"] == pytest.approx(r["s_per_round"] / 2 * 240 / 3600, abs=0.01)
    assert r["train_flops_per_round"] > 0 and "2 at once" in p.stdout


def test_copies_below_one_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_cost.py"), "--copies", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode != 0 and p.stderr.strip() == "error: --copies 0: give how many runs share the device, 1 or more"


def test_measured_entries_skip_settings_and_put_standalone_first():
    from mhpfl.benchmark.suite import load_suite

    suite = load_suite("paper")
    names = [s.name for s in suite.settings]
    rest = [n for n in names if n != "cifar10-N10-C100"]
    plain = [(e.setting, e.method) for e in measured_entries(suite, rest, suite.methods)]
    first = [(e.setting, e.method) for e in measured_entries(suite, rest, suite.methods, standalone_first=True)]
    assert sorted(plain) == sorted(first) and len(set(plain)) == len(plain)  # one seed: each pair once
    assert {s for s, _ in plain} == set(rest)  # every setting but the one left out, the ablations' runs not
    n = len(rest)
    assert first[:n] == [(s, "standalone") for s in rest]  # every setting's Standalone, in the suite's order
    assert first[n:] == [x for x in plain if x[1] != "standalone"]


@pytest.mark.parametrize("args", [["--settings", "cifar10-N10"], ["--methods", "pfedlor"],
                                  ["--skip-settings", "cifar10-N10"]])
def test_an_unknown_setting_or_method_is_a_one_line_error(args, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_cost.py"), *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith(f"error: {args[1]}: not in the paper suite; its settings are cifar10-N10-C100")
