"""A user's results and time: nothing finished is overwritten or lost, damaged result files are
named (and rerun by bench), nonsense settings are refused before any data loads."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from mhpfl.cli import main
from mhpfl.errors import UserError
from mhpfl.results import REQUIRED_FIELDS, load_summary
from tests.conftest import needs_fmnist

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, code, *needles):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def fake_summary(method="standalone", **cfg) -> dict:
    config = {"method": method, "dataset": "fmnist", "clients": 10, "seed": 0, "lr": 0.01, "rounds": 3,
              "method_options": {}, "versions": {"torch": "x"}, **cfg}
    return {"method": method, "config": config, "best_mean_acc": 50.0, "final_mean_acc": 40.0,
            "bytes_up": 100, "bytes_down": 200, "train_flops": 1e9, "rounds_run": 3, "wall_seconds": 1.0,
            "final_std_acc": 1.0, "per_client_final_acc": [40.0] * 10, "selected_mean_acc": 45.0,
            "selected_weighted_acc": 45.0, "selected_mean_acc_participated": 45.0, "selected_round": 2,
            "converged": True, "never_participated": 0, "per_client_selected_acc": [45.0] * 10}


# ---- the schema check ---------------------------------------------------------------------------
@pytest.mark.parametrize("text,why", [
    ('{"method": "x", "best_mean', "not valid JSON"),  # truncated (full disk, partial copy)
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in fake_summary().items() if k != "bytes_up"}), "missing field(s) bytes_up"),
    # the right fields with the wrong types (a hand edit, another tool): named, not a crash where used
    (json.dumps({**fake_summary(), "selected_mean_acc": None}), "field selected_mean_acc is null, not a number"),
    (json.dumps({**fake_summary(), "rounds_run": "3"}), 'field rounds_run is "3", not a whole number'),
    (json.dumps({**fake_summary(), "converged": "yes"}), "field converged is \"yes\", not true, false or null"),
    (json.dumps({**fake_summary(), "config": {**fake_summary()["config"], "method_options": 5}}),
     "method_options) is not an object"),
])
def test_damaged_summary_is_named(tmp_path, text, why):
    f = tmp_path / "run" / "summary.json"
    f.parent.mkdir()
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_summary(f.parent)
    assert str(f) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    f.write_text(json.dumps(fake_summary()))
    assert set(REQUIRED_FIELDS) <= set(load_summary(f))


def test_compare_and_report_name_the_damaged_file(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    (good / "summary.json").write_text(json.dumps(fake_summary()))
    (bad / "summary.json").write_text('{"method": "standalone"')
    one_line_error(capsys, main(["compare", str(good), str(bad)]), str(bad / "summary.json"), "damaged")
    (bad / "summary.json").write_text(json.dumps({"method": "standalone"}))
    one_line_error(capsys, main(["compare", str(good), str(bad)]), str(bad / "summary.json"), "best_mean_acc")
    one_line_error(capsys, main(["compare", str(tmp_path / "nope")]), "not found")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, main(["compare", str(tmp_path / "afile")]), "is a file, not a run folder")

    # a bench folder whose one planned run has a damaged summary
    out = tmp_path / "bench"
    run = out / "runs" / "standalone-abc"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"method": "standalone", "config": {')
    (out / "suite.json").write_text(json.dumps({
        "suite": "t", "methods": ["standalone"], "report": {"reference": "standalone", "baselines": []},
        "settings": [{"name": "A", "label": "A", "target": None, "skipped": [], "methods": ["standalone"]}],
        "entries": [{"method": "standalone", "key": "abc", "run_id": "A|standalone|0", "group": "main",
                     "setting": "A", "seed": 0, "value": None}]}))
    one_line_error(capsys, main(["report", str(out)]), str(run / "summary.json"))


def test_compare_rows_carry_folder_seed_and_differing_settings(tmp_path, capsys):
    dirs = []
    for name, cfg in [("a", {"lr": 0.01}), ("b", {"lr": 0.05}), ("c", {"lr": 0.01, "seed": 1}),
                      ("d", {"lr": 0.01, "method_options": {"rank": 8}})]:
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(fake_summary("pfedlora" if name == "d" else "standalone",
                                                                **cfg)))
        dirs.append(str(d))
    assert main(["compare", *dirs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["run", "method", "seed", "--lr"]
    # the same in every run (or only one method has it): no column
    assert "--rounds" not in header and "--dataset" not in header and "--rank" not in header
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [r[0] for r in rows] == dirs and [r[2] for r in rows] == ["0", "0", "1", "0"]
    assert [r[3] for r in rows] == ["0.01", "0.05", "0.01", "0.01"]


def test_check_collect_names_a_damaged_summary(tmp_path, data_root):
    from mhpfl.benchmark.check import collect
    from mhpfl.benchmark.runner import run_dirname
    from mhpfl.benchmark.suite import load_suite
    from tests._bench_util import write_suite

    suite = load_suite(str(write_suite(tmp_path, data_root)))
    f = tmp_path / "out" / "runs" / run_dirname(suite.entries[0]) / "summary.json"
    f.parent.mkdir(parents=True)
    f.write_text("{")
    with pytest.raises(UserError, match="summary.json is damaged"):
        collect(suite, tmp_path / "out")


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needles", [
    (["standalone", "--grad-clip", "-1"], ["--grad-clip", ">= 0"]),
    (["standalone", "--grad-clip", "nan"], ["--grad-clip"]),
    (["standalone", "--momentum", "-5"], ["--momentum", "[0, 1)"]),
    (["standalone", "--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["standalone", "--weight-decay", "-1"], ["--weight-decay", ">= 0"]),
    (["standalone", "--val-size", "-5"], ["--val-size", ">= 0"]),
    (["standalone", "--public-size", "-1"], ["--public-size", ">= 0"]),
    (["standalone", "--lr", "inf"], ["--lr", "finite", "> 0"]),
    (["standalone", "--lr", "nan"], ["--lr"]),
    (["standalone", "--lr", "0"], ["--lr"]),
    (["standalone", "--seed", "-1"], ["--seed", ">= 0"]),
    (["pfedlora", "--rank", "0"], ["--rank", "[1, inf)"]),  # the option's interval; the zoo's bound below
    (["pfedlora", "--rank", "100000"], ["--rank", "[1, 10]", "fc3"]),
    (["pfedlora", "--rank", "17", "--adapter", "conv1"], ["--rank", "[1, 16]"]),
    (["pfedlora", "--rank", "3200", "--adapter", "model"], ["--rank", "[1, 3136]"]),
    (["pfedlora", "--adapter", "fc9"], ["--adapter", "fc9"]),
    (["pfedlora", "--adapter", ","], ["--adapter"]),
    (["pfedlora", "--adapter", "pool"], ["--adapter", "'pool'"]),  # exists, but not Linear/Conv2d
    (["pfedlora", "--lora-alpha", "-1"], ["--lora-alpha", "[0, inf)"]),
])
def test_nonsense_is_refused_before_data_loads(tmp_path, capsys, args, needles):
    """CIFAR-10 from an empty data root with --no-download: had the check not fired, the error
    would be 'not found'; and the --out folder must not even be created."""
    code = main(["run", *args, "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--no-download",
                 "--out", str(tmp_path / "out")])
    err = one_line_error(capsys, code, *needles)
    assert "not found" not in err and not (tmp_path / "out").exists()


def test_valid_pfedlora_ranks_pass(tiny_cfg):
    tiny_cfg("pfedlora", method_options={"rank": 10}).validate()
    tiny_cfg("pfedlora", method_options={"rank": 16, "adapter": "conv1"}).validate()
    tiny_cfg("pfedlora", method_options={"rank": 16, "adapter": "model"}).validate()
    tiny_cfg("pfedlora", method_options={"rank": 1, "adapter": "fc1,fc2"}, zoo="homo").validate()


@pytest.mark.parametrize("argv", [["report", "DIR", "--target", "150"], ["report", "DIR", "--target", "0"],
                                  ["bench", "smoke", "--target", "-3", "--dry-run"]])
def test_report_targets_outside_0_100_are_refused(tmp_path, capsys, argv):
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    one_line_error(capsys, main(argv), "--target", "(0, 100]")


def test_suite_targets_outside_0_100_are_refused(tmp_path, data_root):
    from mhpfl.benchmark.suite import load_suite
    from tests._bench_util import write_suite

    with pytest.raises(UserError, match=r"target must be an accuracy in percent, in \(0, 100\]"):
        load_suite(str(write_suite(tmp_path, data_root, extra="target = 120")))
    with pytest.raises(UserError, match=r"\(0, 100\]"):
        load_suite(str(write_suite(tmp_path, data_root, extra="[report]\ntarget = 0")))


# ---- never overwrite, never lose ------------------------------------------------------------------
TINY = ["--clients", "5", "--rounds", "1", "--train-fraction", "0.05", "--batch-size", "32", "--quiet",
        "--no-download"]


@needs_fmnist
def test_run_never_overwrites_a_finished_result(tmp_path, data_root, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["run", "standalone", *TINY, "--data-root", data_root]
    # default folders name the configuration: another --lr goes elsewhere
    assert main(base) == 0 and main([*base, "--lr", "0.05"]) == 0
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 2 and all(p.startswith("standalone-fmnist-N5-seed0-") for p in made)
    capsys.readouterr()

    out = tmp_path / "runs" / made[0]
    before = (out / "summary.json").read_bytes()
    lr_before = json.loads(before)["config"]["lr"]
    other_lr = "0.05" if lr_before == 0.01 else "0.01"
    # the same configuration again: nothing runs, the result is shown
    assert main([*base, "--lr", str(lr_before), "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == before
    # another configuration into the same folder: refused, naming what differs
    one_line_error(capsys, main([*base, "--lr", other_lr, "--out", str(out)]),
                   "another configuration", f"--lr {lr_before} -> {float(other_lr)}", "--overwrite")
    assert (out / "summary.json").read_bytes() == before
    # --force redoes the same one; --overwrite replaces it
    assert main([*base, "--lr", str(lr_before), "--out", str(out), "--force"]) == 0
    assert main([*base, "--lr", other_lr, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["lr"] == float(other_lr)
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]  # no leftovers


@needs_fmnist
def test_a_finished_rerun_that_cannot_replace_the_old_one_is_kept(tmp_path, data_root, capsys, monkeypatch):
    """--force / --overwrite put the new run in place of the old only when it is complete; where the
    old folder cannot be moved (immutable, another owner), the new run stays where it finished."""
    out = tmp_path / "run"
    base = ["run", "standalone", *TINY, "--data-root", data_root, "--out", str(out)]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    real = os.replace

    def replace(src, dst):
        if Path(src) == out:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    one_line_error(capsys, main([*base, "--force"]), "the new run is complete in", "cannot be replaced",
                   "Operation not permitted", "another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (new,) = [p for p in tmp_path.iterdir() if p.name.startswith(".run.inflight.")]
    assert json.loads((new / "summary.json").read_text())["config"] == json.loads(before["summary.json"])["config"]


def test_a_run_that_fails_before_training_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, main(["run", "standalone", "--dataset", "cifar10", "--no-download", "--rounds", "1",
                                 "--data-root", str(tmp_path / "empty"), "--out", str(out)]), "cifar10 not found")
    assert not out.exists()


class FullDisk:
    """A file object whose write stores half of the text, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk(monkeypatch, when=lambda path: True):
    """Make mhpfl.io's writes fail half-way for files whose path satisfies `when`."""
    import mhpfl.io

    real = os.fdopen

    def fdopen(fd, *a, **kw):
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else ""
        f = real(fd, *a, **kw)
        return FullDisk(f) if when(path) else f

    monkeypatch.setattr(mhpfl.io.os, "fdopen", fdopen)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from mhpfl.io import atomic_write_json

    f = tmp_path / "summary.json"
    atomic_write_json(f, {"best_mean_acc": 1.0})
    before = f.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(UserError) as e:
        atomic_write_json(f, {"best_mean_acc": 2.0, "pad": "x" * 10_000})
    msg = str(e.value)
    assert str(f) in msg and "No space left on device" in msg and "previous version is unchanged" in msg
    assert f.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@needs_fmnist
@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc to tell which file is written")
def test_full_disk_during_a_rerun_keeps_the_previous_result(tmp_path, data_root, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["run", "standalone", *TINY, "--data-root", data_root, "--out", str(out)]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    full_disk(monkeypatch, when=lambda path: ".summary.json." in path)  # after every round was written
    one_line_error(capsys, main([*base, "--force"]), "No space left on device", "summary.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the attempt left nothing


@needs_fmnist
def test_bench_reruns_a_damaged_cached_run_and_reports_failures_by_name(tmp_path, data_root, capsys):
    from mhpfl.methods import register, unregister
    from tests._bench_util import Probe, write_suite

    class Boom(Probe):
        def client_update(self, client, message, phase):
            raise RuntimeError("boom")

    register(Boom, "boom")
    try:
        suite = write_suite(tmp_path, data_root, methods=("standalone", "boom"), rounds=1)
        out = tmp_path / "out"
        # one failing run: the others finish, the failure is named
        assert main(["bench", str(suite), "--out", str(out), "--quiet", "--no-report"]) == 1
        err = capsys.readouterr().err
        assert "1 run(s) failed" in err and "A|boom|seed0: RuntimeError: boom" in err and "boom" in err
        done = next((out / "runs").glob("standalone-*"))
        good = (done / "summary.json").read_bytes()
        (done / "summary.json").write_bytes(good[: len(good) // 2])  # a truncated copy
        assert main(["bench", str(suite), "--out", str(out), "--quiet", "--no-report"]) == 1  # boom again
        outp = capsys.readouterr().out
        assert f"damaged result {done / 'summary.json'}" in outp and "running it again" in outp
        assert json.loads((done / "summary.json").read_text())["method"] == "standalone"
    finally:
        unregister("boom")


@needs_fmnist
def test_damaged_files_of_a_bench_folder_are_named_and_a_cut_rounds_csv_is_rerun(tmp_path, data_root, capsys):
    """A bench folder's rounds.csv, run.json and bench.json, cut or garbled (a partial copy, a hand
    edit): `report` names the file in one line (it crashed in pandas or json), and `bench` treats
    a run whose rounds.csv is cut as unfinished and trains it again."""
    from tests._bench_util import write_suite

    suite, out = write_suite(tmp_path, data_root), tmp_path / "out"
    bench = ["bench", str(suite), "--out", str(out), "--quiet"]
    assert main(bench) == 0
    run = next((out / "runs").glob("standalone-*"))
    capsys.readouterr()
    good = (run / "rounds.csv").read_text()
    (run / "rounds.csv").write_text(good.split(",train_flops")[0])  # the header cut short
    one_line_error(capsys, main(["report", str(out)]), str(run / "rounds.csv"), "lacks column(s) train_flops",
                   f"delete {run}")
    assert main(bench) == 0
    assert "running it again" in capsys.readouterr().out
    def no_wall(text):
        return [line.rsplit(",", 1)[0] for line in text.splitlines()]

    assert no_wall((run / "rounds.csv").read_text()) == no_wall(good)  # retrained: the same seeded run
    for name, fix in (("run.json", f"delete {run}"), ("bench.json", "it only logs past bench sessions")):
        f = run / name if name == "run.json" else out / name
        keep = f.read_text()
        f.write_text(keep[: len(keep) // 2])
        one_line_error(capsys, main(["report", str(out)]), str(f), "damaged", fix)
        f.write_text(keep)
    assert main(["report", str(out)]) == 0


# ---- mhpfl check finds its reference ------------------------------------------------------------
def test_check_finds_the_reference_from_anywhere(tmp_path, monkeypatch, capsys):
    from mhpfl.benchmark import check

    repo = check.repository_root()
    assert repo is not None and (repo / check.DEFAULT_REFERENCE).is_file()  # tests run from a checkout
    deep = repo / "mhpfl" / "benchmark"
    assert check.locate_reference(cwd=deep) == repo / check.DEFAULT_REFERENCE  # a subfolder
    assert check.locate_reference(cwd=tmp_path) == repo / check.DEFAULT_REFERENCE  # outside: the checkout
    # another repository copy above the working directory wins over the installed checkout
    other = tmp_path / "other"
    (other / "results" / "smoke").mkdir(parents=True)
    (other / "results" / "smoke" / "reference.json").write_text("{}")
    (other / "sub").mkdir()
    assert check.locate_reference(cwd=other / "sub") == other / check.DEFAULT_REFERENCE
    # no checkout to fall back on (a plain install): say where to start, never guess a place
    monkeypatch.setattr(check, "repository_root", lambda: None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="start 'mhpfl check' at the repository root or pass --reference"):
        check.locate_reference(update=True, cwd=Path("/"))
    one_line_error(capsys, main(["check", "--update"]), "repository root")
