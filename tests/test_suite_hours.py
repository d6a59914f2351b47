"""benchmarks/suite_hours.py: a suite's device-hours from paper_cost.py's measurements, with what
was measured, projected, priced as Standalone or not priced kept apart."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.suite_hours import suite_hours, totals
from mhpfl.benchmark.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]
GPU_FILES = [ROOT / "docs" / "measurements" / "gpu-h200-2026-12-04" / f
             for f in ("cifar10_n10.json", "cifar10_n10_ieee.json", "paper_suite.json")]


def row(setting, method, s, precision="fp32", batching="off"):
    return {"setting": setting, "method": method, "s_per_round": s, "precision": precision, "batch_clients": batching}


@pytest.fixture(scope="module")
def paper():
    return load_suite("paper")


def pair(table, setting, method):
    (r,) = table[(table["setting"] == setting) & (table["method"] == method)].to_dict("records")
    return r


def test_each_run_is_priced_by_its_own_row_or_by_standalone_times_the_nearest_ratio(paper):
    alone = {s.name: 1.0 + i for i, s in enumerate(paper.settings)}  # Standalone measured everywhere
    rows = [row(s, "standalone", v) for s, v in alone.items()]
    rows += [row("cifar10-N10-C100", "fedmd", 6.0), row("cifar10-N50-C20", "fedmd", 4.0),
             row("cifar100-N10-C100", "fedmd", 16.0), row("cifar10-N10-C100", "fedmd", 4.0, "bf16")]
    t = suite_hours(paper, rows, as_standalone=("fedkd",))
    runs = paper.runs().values()
    assert t["runs"].sum() == len(runs) == 399 and len(t) == len({(e.setting, e.method) for e in runs})
    for r in t.to_dict("records"):  # runs and rounds are the suite's: every seed, every ablation value
        mine = [e for e in runs if (e.setting, e.method) == (r["setting"], r["method"])]
        assert (r["runs"], r["rounds"]) == (len(mine), sum(e.cfg.rounds for e in mine))
        if not pd.isna(r["hours"]):
            assert r["hours"] == pytest.approx(r["s_per_round"] * r["rounds"] / 3600, rel=1e-3)
    assert pair(t, "cifar10-N10-C100", "fedmd")["s_per_round"] == 6.0  # fp32's row, not bf16's
    assert pair(t, "cifar10-N10-C100", "fedmd")["basis"] == "measured"
    # same N, same dataset: CIFAR-100's N10 ratio (16/4) for its homogeneous N10, not CIFAR-10's (6/1)
    r = pair(t, "cifar100-homo-N10-C100", "fedmd")
    assert r["s_per_round"] == pytest.approx(alone["cifar100-homo-N10-C100"] * 16 / 4)
    assert r["basis"] == "projected: Standalone's x 4.00 (the ratio in cifar100-N10-C100)"
    # same N, other dataset: CIFAR-10 homogeneous N10 takes CIFAR-10's N10 ratio
    assert pair(t, "cifar10-homo-N10-C100", "fedmd")["s_per_round"] == pytest.approx(alone["cifar10-homo-N10-C100"] * 6)
    # no N100 measured: N50 is nearer than N10
    r = pair(t, "cifar100-N100-C10", "fedmd")
    assert r["s_per_round"] == pytest.approx(alone["cifar100-N100-C10"] * 4.0 / alone["cifar10-N50-C20"])
    assert "cifar10-N50-C20" in r["basis"]
    r = pair(t, "cifar10-N50-C20", "fedkd")  # measured nowhere, named: Standalone's time, and said so
    assert r["s_per_round"] == alone["cifar10-N50-C20"] and r["basis"].startswith("as Standalone")
    r = pair(t, "cifar10-N50-C20", "fml")  # measured nowhere, not named: not priced
    assert pd.isna(r["hours"]) and r["basis"] == "not priced: the method was measured in no setting"
    got = totals(t)
    assert got["all"]["runs"] == 399 and got["measured"]["runs"] == 3 * 12 + 3 * 3
    assert sum(v["runs"] for k, v in got.items() if k != "all") == 399
    assert got["all"]["hours"] is None  # FML and others are not priced
    rows += [row("cifar10-N10-C100", m, 2.0) for m in paper.methods if m not in ("standalone", "fedmd", "fedkd")]
    got = totals(suite_hours(paper, rows, as_standalone=("fedkd",)))
    assert "not priced" not in got and got["all"]["runs"] == 399
    assert got["all"]["hours"] == pytest.approx(sum(v["hours"] for k, v in got.items() if k != "all"), abs=0.2)


def test_a_later_row_replaces_an_earlier_one_and_a_setting_without_standalone_is_not_priced(paper):
    rows = [row("cifar10-N50-C20", "standalone", 1.0), row("cifar10-N50-C20", "fd", 3.0),
            row("cifar10-N50-C20", "fd", 2.0)]
    t = suite_hours(paper, rows)
    assert pair(t, "cifar10-N50-C20", "fd")["s_per_round"] == 2.0
    assert pd.isna(pair(t, "cifar10-N100-C10", "fd")["hours"])
    assert pair(t, "cifar10-N100-C10", "fd")["basis"] == "not priced: Standalone not measured in this setting"
    got = totals(t)
    assert got["not priced"]["hours"] is None and got["all"]["hours"] is None  # no whole-suite figure
    assert got["not priced"]["runs"] == 399 - 6  # N50's Standalone and FD only: other methods are measured nowhere


def test_the_committed_h200_files_give_the_documented_gpu_hours(tmp_path):
    """docs/performance.md's 148 H200-hours (50.5 measured, 97.5 projected) come from these files."""
    out = tmp_path / "hours.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_hours.py"), *map(str, GPU_FILES),
                        "--as-standalone", "fedavg", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    t = json.loads(out.read_text())["totals"]
    assert (t["measured"]["runs"], t["measured"]["hours"]) == (111, 50.5)
    assert t["projected"]["runs"] + t["as Standalone"]["runs"] == 288
    assert round(t["projected"]["hours"] + t["as Standalone"]["hours"], 1) == 97.5
    assert (t["all"]["runs"], t["all"]["hours"]) == (399, 148.0)
    assert "cuda (NVIDIA H200)" in p.stdout and "all 399 runs, 148.0 h" in p.stdout


def test_files_from_two_suites_or_machines_are_a_one_line_error(tmp_path):
    other = json.loads(GPU_FILES[0].read_text())
    other["gpu"] = "NVIDIA A100"
    (tmp_path / "a100.json").write_text(json.dumps(other))
    for files, says in (([GPU_FILES[0], tmp_path / "a100.json"], "differ in gpu 'NVIDIA H200' vs 'NVIDIA A100'"),
                        ([tmp_path / "absent.json"], "absent.json: not a paper_cost.py report")):
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_hours.py"), *map(str, files)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")
        assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr


def test_rows_measured_with_copies_price_a_round_at_its_share_of_the_device(paper):
    rows = [row("cifar10-N50-C20", "standalone", 2.0), row("cifar10-N50-C20", "fd", 4.0)]
    rows += [dict(r, s_per_round=r["s_per_round"] * 3, copies=4) for r in rows]  # 4 at once: 3x slower each
    one, four = suite_hours(paper, rows), suite_hours(paper, rows, copies=4)
    assert pair(one, "cifar10-N50-C20", "fd")["s_per_round"] == 4.0
    assert pair(four, "cifar10-N50-C20", "fd")["s_per_round"] == 3.0  # 12 s each, four sharing the device
    assert pair(four, "cifar10-N50-C20", "standalone")["hours"] == pytest.approx(1.5 * 1500 / 3600)



def test_pairs_not_measured_sharing_the_device_are_extrapolated_with_standalones_factor_from_one_file(paper):
    """--copies K: a pair measured with K at once is priced so; any other is its price alone x
    Standalone's K-at-once factor, taken from one file's alone and K-at-once rows (the same call),
    in the nearest setting; without such a factor it is not priced."""
    n10, n50 = "cifar10-N10-C100", "cifar10-N50-C20"
    rows = [dict(row(n50, "standalone", 2.0), file=0), dict(row(n50, "fd", 4.0), file=0),
            dict(row("cifar10-N100-C10", "standalone", 1.0), file=0),
            dict(row(n10, "standalone", 3.0), file=1), dict(row(n10, "standalone", 6.0), file=1, copies=4),
            dict(row(n10, "fedmd", 9.0), file=1),
            dict(row(n50, "standalone", 100.0), file=2, copies=4)]  # no alone row in its file: no factor
    t = suite_hours(paper, rows, copies=4)
    assert pair(t, n10, "standalone")["s_per_round"] == 1.5 and pair(t, n10, "standalone")["basis"] == "measured"
    r = pair(t, n10, "fedmd")  # 9 s alone x (6 / 4) / 3
    assert r["s_per_round"] == 4.5
    assert r["basis"] == f"shared: measured x 0.50 (Standalone's 4-at-once factor in {n10})"
    assert pair(t, n50, "fd")["s_per_round"] == 2.0  # N50's only factor would mix two files: N10's is used
    assert pair(t, n50, "standalone")["s_per_round"] == 25.0  # measured 4 at once
    r = pair(t, "cifar10-N100-C10", "fd")  # projected alone (1 s x N50's ratio 4 / 2), then shared
    assert r["s_per_round"] == 1.0 and r["basis"].startswith("shared: projected: Standalone's x 2.00")
    r = pair(t, "cifar100-N100-C10", "fd")
    assert pd.isna(r["hours"]) and r["basis"] == "not priced: Standalone not measured in this setting"
    got = totals(t)
    assert got["shared"]["runs"] > 0 and got["measured"]["runs"] == 6 and got["all"]["hours"] is None
    t = suite_hours(paper, [r for r in rows if r["file"] != 1], copies=4)  # no factor anywhere
    assert pair(t, n50, "fd")["basis"] == "not priced: Standalone measured alone and 4 at once in no setting"


def test_session_abs_files_give_the_documented_gpu_hours_alone_and_four_at_once(tmp_path):
    """docs/performance.md's 151.0 H200-hours one run per GPU and 45.2 four at once (session AB's
    CIFAR-10 N10 rows and its 1-and-4-at-once Standalone rows, with session Z's other settings)."""
    z, ab = GPU_FILES[0].parent, ROOT / "docs" / "measurements" / "gpu-h200-2026-12-04b"
    files = [z / "cifar10_n10_ieee.json", z / "paper_suite.json", ab / "copies.json", ab / "cifar10_n10.json"]
    for copies, hours in ((1, 151.0), (4, 45.2)):
        out = tmp_path / f"hours{copies}.json"
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_hours.py"), *map(str, files),
                            "--as-standalone", "fedavg", "--copies", str(copies), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        t = json.loads(out.read_text())["totals"]
        assert (t["all"]["runs"], t["all"]["hours"]) == (399, hours)
    assert (t["measured"]["runs"], t["shared"]["runs"]) == (3, 396)
