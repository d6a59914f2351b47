"""`mhpfl check`: passes when nothing changed, fails when a method's bytes change or its accuracy
drops beyond tolerance (even though the method's version, hence its cache key, did not change),
and refuses a reference made by another suite."""
from __future__ import annotations

import json

import pytest

from tests._bench_util import Probe, Stopper, write_suite
from tests.conftest import needs_fmnist
from mhpfl.benchmark.check import run_check
from mhpfl.benchmark.suite import load_suite
from mhpfl.cli import main
from mhpfl.errors import UserError
from mhpfl.methods import register, unregister


pytestmark = pytest.mark.usefixtures("one_thread")


class MoreBytes(Probe):
    upload = 11  # one float more per upload: 4 bytes per client per round


class Blind(Probe):
    broken_predict = True  # predicts class 0 only: accuracy collapses


@needs_fmnist
def test_check_passes_then_catches_bytes_and_accuracy(tmp_path, data_root):
    suite_file = write_suite(tmp_path, data_root, name="mini", methods=("probe",), rounds=1)
    ref = tmp_path / "reference.json"
    lines: list[str] = []
    try:
        register(type("Same", (Probe,), {}), "probe")
        suite = load_suite(str(suite_file))
        assert run_check(suite, ref, update=True, progress=False, log=lines.append) == 0
        data = json.loads(ref.read_text())
        assert data["suite"] == "mini" and list(data["runs"]) == ["A|probe|seed0"]
        assert data["runs"]["A|probe|seed0"]["bytes_up"] == 5 * 10 * 4  # 5 clients, 10 floats

        lines.clear()
        assert run_check(suite, ref, progress=False, log=lines.append) == 0  # nothing changed
        assert "check passed" in lines[-1]

        register(MoreBytes, "probe")  # same name, same version: only a real rerun can see it
        lines.clear()
        assert run_check(load_suite(str(suite_file)), ref, progress=False, log=lines.append) == 1
        table = "\n".join(lines)
        assert "bytes_up" in table and "FAIL: bytes up changed" in table and "+20" in table
        assert "best_mean_acc" not in table  # accuracy did not move
        assert "check FAILED" in lines[-1]

        register(Blind, "probe")
        lines.clear()
        assert run_check(load_suite(str(suite_file)), ref, progress=False, log=lines.append) == 1
        table = "\n".join(lines)
        assert "FAIL: accuracy moved beyond tolerance" in table and "bytes_up" not in table
        # ... unless the tolerance allows it (per-method tolerances live in the reference)
        data["tolerance"]["per_method"] = {"probe": 100.0}
        ref.write_text(json.dumps(data))
        lines.clear()
        assert run_check(load_suite(str(suite_file)), ref, progress=False, log=lines.append) == 0
        assert "within tolerance" in "\n".join(lines)
    finally:
        unregister("probe")


def test_reference_of_another_suite_is_refused(tmp_path, data_root, capsys):
    suite_file = write_suite(tmp_path, data_root, name="mini")
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"suite": "smoke", "runs": {}}))
    with pytest.raises(UserError, match="made by suite 'smoke', not 'mini'"):
        run_check(load_suite(str(suite_file)), ref, progress=False)
    assert main(["check", "--suite", str(suite_file), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not 'mini'" in err and "\n" not in err
    assert main(["check", "--suite", str(suite_file), "--reference", str(tmp_path / "none.json")]) == 2
    assert "mhpfl check --update" in capsys.readouterr().err


GOOD_RUN = {"method": "m", "selected_mean_acc": 50.0, "best_mean_acc": 50.0, "final_mean_acc": 50.0,
            "bytes_up": 1, "bytes_down": 1, "train_flops": 1}


@pytest.mark.parametrize("change,why", [
    ({"runs": {"r": {**GOOD_RUN, "selected_mean_acc": "x"}}}, "run r's method, accuracies or bytes"),
    ({"runs": {"r": {**GOOD_RUN, "train_flops": None}}}, "run r's method"),
    ({"runs": {"r": 5}}, "run r's method"),
    ({"runs": []}, "runs is not an object"),
    ({"tolerance": "x"}, "tolerance is not"),
    ({"tolerance": {"default": float("nan")}}, "tolerance is not"),
    ({"bytes_rel_tolerance": 3}, "bytes_rel_tolerance is not"),
])
def test_a_damaged_reference_is_refused_before_any_run(tmp_path, data_root, change, why):
    """(It crashed in the comparison, after the whole suite had run.)"""
    suite_file = write_suite(tmp_path, data_root, name="mini")
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"suite": "mini", "runs": {"r": GOOD_RUN}, **change}))
    with pytest.raises(UserError, match=f"{ref} is damaged \\({why}.*check --update"):
        run_check(load_suite(str(suite_file)), ref, progress=False, log=lambda m: pytest.fail("it ran: " + m))


def test_check_refuses_a_folder_as_reference_and_a_nan_tolerance(tmp_path, data_root):
    suite = load_suite(str(write_suite(tmp_path, data_root, name="mini")))
    with pytest.raises(UserError, match="is a folder; pass the reference's file"):
        run_check(suite, tmp_path, update=True, progress=False)
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"suite": "mini", "runs": {"r": GOOD_RUN}}))
    with pytest.raises(UserError, match="--tolerance must be a finite number >= 0"):
        run_check(suite, ref, tolerance=float("nan"), progress=False)


def test_a_reference_without_a_metric_is_a_failure_not_a_crash():
    from mhpfl.benchmark.check import compare

    now = {"r": {"method": "m", "selected_mean_acc": 50.0, "best_mean_acc": 50.0, "final_mean_acc": 50.0,
                 "bytes_up": 1, "bytes_down": 1, "train_flops": 1}}
    old = {"r": {k: v for k, v in now["r"].items() if k != "selected_mean_acc"}}
    df, bad = compare(old, now, {}, default_tol=2.0, tol_per_method={}, bytes_rel={})
    assert bad and "selected_mean_acc" in df["metric"].iloc[0] and "--update" in df["status"].iloc[0]


@needs_fmnist
def test_interrupted_check_says_so_and_leaves_the_reference(tmp_path, data_root):
    from mhpfl.errors import Interrupted

    ref = tmp_path / "reference.json"
    register(Stopper, "stopper")
    try:
        suite = load_suite(str(write_suite(tmp_path, data_root, methods=("standalone", "stopper"))))
        with pytest.raises(Interrupted, match="the check stopped before comparing anything"):
            run_check(suite, ref, update=True, progress=False, log=lambda m: None)
    finally:
        unregister("stopper")
    assert not ref.exists()
