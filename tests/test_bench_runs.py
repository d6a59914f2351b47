"""`mhpfl bench` and `mhpfl report` end to end on a tiny suite: caching, --force, failures,
interrupted runs, identical rewrites, bad folders."""
from __future__ import annotations

import json
import os

import pytest

from tests._bench_util import Probe, Stopper, squash, write_suite
from tests.conftest import needs_fmnist, sigterm_cli
from mhpfl.benchmark.report import write_report
from mhpfl.benchmark.runner import run_suite
from mhpfl.benchmark.suite import load_suite
from mhpfl.cli import main
from mhpfl.methods import register, unregister


pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Probe):
    """Fails in round 2, after round 1 wrote its files: an interrupted run."""

    def client_update(self, client, message, phase):
        if client.cfg.rounds >= 2 and getattr(client, "_seen", 0) >= 1:
            raise RuntimeError("boom")
        client._seen = getattr(client, "_seen", 0) + 1
        return super().client_update(client, message, phase)


@needs_fmnist
def test_bench_caches_resumes_and_reports(tmp_path, data_root, capsys):
    register(Crash, "crash")
    try:
        suite = load_suite(str(write_suite(tmp_path, data_root, methods=("standalone", "crash"),
                                           extra='[report]\nreference = "crash"\nbaselines = ["standalone"]')))
        out = tmp_path / "out"
        # a stale in-flight folder of a dead process (kill -9) is cleaned, never reported
        stale = out / ".inflight" / "standalone-deadbeef.999999999"
        stale.mkdir(parents=True)
        (stale / "summary.json").write_text("{}")
        res = run_suite(suite, out, progress=False)
        assert not stale.exists()
        assert (res.total, res.trained, res.cached) == (2, 1, 0)
        assert [e.method for e, _ in res.failed] == ["crash"] and "boom" in res.failed[0][1]
        # the crashed run left nothing a report would read; its error is kept for the user
        assert not list((out / "runs").glob("crash-*"))
        assert not any((out / ".inflight").iterdir())
        assert "boom" in next((out / "failed").glob("crash-*.txt")).read_text()
        done = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
        assert len(done) == 1

        files = write_report(out)
        for f in ("accuracy.md", "accuracy.csv", "accuracy.tex", "cost.md", "cost.csv", "cost.tex",
                  "headline.md", "README.md", "accuracy_vs_round.png", "accuracy_vs_bytes.pdf",
                  "accuracy_vs_flops.png", "client_accuracy.pdf"):
            assert f in files and (out / f).stat().st_size > 0
        acc = squash((out / "accuracy.md").read_text())
        assert "| crash | not run |" in acc and "Incomplete: 1 planned run" in acc
        alone = json.loads((out / "runs" / next(iter(done)) / "summary.json").read_text())
        # a 2-round run may not have converged, or have no verdict
        mark = "" if alone["converged"] else "§" if "reason" in alone["convergence"] else "‡"
        assert f"| Standalone | **{alone['selected_mean_acc']:.2f}**{mark} |" in acc
        before = {f: (out / f).read_bytes() for f in files if not f.endswith((".png", ".pdf"))}

        # rerun: only the failed run is attempted again; finished runs are untouched
        unregister("crash")
        register(type("Fixed", (Probe,), {}), "crash")  # "fixed" (a subclass: register renames)
        res2 = run_suite(suite, out, progress=False)
        assert (res2.trained, res2.cached, res2.failed) == (1, 1, [])
        assert all((out / "runs" / n / "summary.json").stat().st_mtime_ns == t for n, t in done.items())
        res3 = run_suite(suite, out, progress=False)
        assert (res3.trained, res3.cached) == (0, 2)  # nothing to train

        # the report is a pure function of the finished runs: identical tables when rewritten
        write_report(out)
        first = {f: (out / f).read_bytes() for f in before}
        write_report(out)
        assert first == {f: (out / f).read_bytes() for f in before}
        acc = first["accuracy.md"].decode()
        assert "Incomplete" not in acc and acc != before["accuracy.md"].decode()
        s = {p.name.split("-")[0]: json.loads((p / "summary.json").read_text()) for p in (out / "runs").iterdir()}
        mine, alone = s["crash"]["selected_mean_acc"], s["standalone"]["selected_mean_acc"]
        assert f"{mine:.2f}" in acc and f"**{max(mine, alone):.2f}**" in acc
        assert f"{mine - alone:+.2f} (vs Standalone)" in acc  # the margin row
        head = first["headline.md"].decode()
        assert "+1.35" in head and "11.81x" in head and "7.41x" in head and f"{mine - alone:+.2f}" in head
        cost = first["cost.md"].decode()
        assert "target accuracy" in cost and "(1.00x)" in cost
        up = s["crash"]["bytes_up"] / (2 * 5)  # per participating client per round
        assert f"{up:.3g} B" in cost

        # --force reruns (a suite naming the same standalone run) and gives the same numbers
        only = load_suite(str(write_suite(tmp_path, data_root, name="only")))
        res4 = run_suite(only, tmp_path / "out", force=True, progress=False)
        assert res4.trained == 1
        new = json.loads((out / "runs" / next(iter(done)) / "summary.json").read_text())
        assert new["selected_mean_acc"] == alone and new["train_flops"] == s["standalone"]["train_flops"]
        assert (out / "runs" / next(iter(done)) / "summary.json").stat().st_mtime_ns != done[next(iter(done))]
    finally:
        unregister("crash")


@needs_fmnist
def test_interrupted_bench_keeps_finished_runs_and_records_its_session(tmp_path, data_root):
    import signal

    from mhpfl.errors import Interrupted

    register(Stopper, "stopper")
    try:
        suite = load_suite(str(write_suite(tmp_path, data_root, methods=("standalone", "stopper"))))
        out = tmp_path / "out"
        with pytest.raises(Interrupted) as err:
            run_suite(suite, out, jobs=1, progress=False)
    finally:
        unregister("stopper")
    assert err.value.signum == signal.SIGTERM
    assert "1 of the suite's 2 runs are finished" in err.value.message
    assert [p.name.split("-")[0] for p in (out / "runs").iterdir()] == ["standalone"]
    assert not list((out / ".inflight").glob("*")) and not (out / "failed").exists()
    session, = json.loads((out / "bench.json").read_text())["sessions"]
    assert (session["runs_trained"], session["interrupted"]) == (1, "SIGTERM")
    assert session["machine"]["cores"] >= 1
    write_report(out)
    assert "1 run(s) trained, 0 cached, --jobs 1, stopped by SIGTERM" in (out / "README.md").read_text()


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    kids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(d))
    return kids


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@needs_fmnist
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_sigterm_stops_the_bench_and_its_workers_and_keeps_finished_runs(tmp_path, data_root):
    """`timeout`/`kill` send SIGTERM to the bench process alone: it must stop its worker processes
    (not leave them training), keep the finished runs, and say so in one line."""
    import signal
    import time

    out = tmp_path / "out"
    done = run_suite(load_suite(str(write_suite(tmp_path, data_root, name="one"))), out, progress=False)
    assert done.trained == 1
    finished_before = {p.name: (p / "summary.json").read_bytes() for p in (out / "runs").iterdir()}
    # the same run (cached) and three long ones: two in flight when the signal comes, one queued
    long_ = write_suite(tmp_path, data_root, name="long", extra="".join(
        f'[[settings]]\nname = "{n}"\nrounds = {r}\n' for n, r in (("B", 5000), ("C", 4000), ("D", 3000))))

    def two_in_flight() -> bool:
        return len(list((out / ".inflight").glob("*"))) == 2

    rc, lines, workers = sigterm_cli(["bench", str(long_), "--out", str(out), "--jobs", "2", "--threads", "1",
                                      "--quiet", "--no-report"], ready=two_in_flight,
                                     before_signal=_children)
    assert len(workers) >= 2  # the two runs' worker processes (and the pool's helpers)
    assert rc == 128 + signal.SIGTERM and len(lines) == 1, lines
    assert lines[0].startswith("error: interrupted by SIGTERM; 1 of the suite's 4 runs are finished"), lines
    assert "rerun the same command to train the other 3" in lines[0]
    deadline = time.monotonic() + 30
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _running(w)], "worker processes still running after the bench stopped"
    assert {p.name: (p / "summary.json").read_bytes() for p in (out / "runs").iterdir()} == finished_before
    assert not list((out / ".inflight").glob("*"))


def test_report_on_empty_or_foreign_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no suite.json" in err and "mhpfl bench" in err and "\n" not in err
    (tmp_path / "suite.json").write_text(json.dumps({"suite": "x", "settings": [], "entries": [], "methods": [],
                                                     "report": {}}))
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_second_bench_into_same_folder_is_refused(tmp_path, data_root):
    import fcntl

    from mhpfl.errors import UserError

    suite = load_suite(str(write_suite(tmp_path, data_root)))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        pid = os.fork()
        if pid == 0:  # another process tries to run into the locked folder
            try:
                run_suite(suite, out, progress=False)
                os._exit(1)
            except UserError as e:
                os._exit(0 if "another 'mhpfl bench'" in str(e) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@needs_fmnist
def test_a_suite_without_validation_data_says_so_in_its_tables(tmp_path, data_root, capsys):
    """When the public pool takes the whole held-out pool no client holds validation data (as in
    benchmarks/vs-2aa251f/new.toml): each run is reported at its final round and has no
    convergence verdict. The tables say that, not "validation-selected" and "did not converge"."""
    # 2000 x train_fraction 0.05 = the 100 held out
    suite = load_suite(str(write_suite(tmp_path, data_root, extra="val_size = 100\npublic_size = 2000")))
    out = tmp_path / "out"
    run_suite(suite, out, progress=False)
    s = json.loads(next((out / "runs").glob("standalone-*/summary.json")).read_text())
    assert s["selection"] == "final round (no validation data)" and s["selected_round"] == 2
    assert s["converged"] is None and "reason" in s["convergence"]
    write_report(out, do_plots=False)
    acc = squash((out / "accuracy.md").read_text())
    assert f"| Standalone | **{s['selected_mean_acc']:.2f}**§ |" in acc and "‡ |" not in acc
    assert "§: the convergence of at least one seed was not judged" in acc
    assert "reported at its final round instead" in acc
    assert "reported at its final round instead" in (out / "headline.md").read_text()
    assert r"$^\S$" in (out / "accuracy.tex").read_text()


@needs_fmnist
def test_settings_that_share_a_label_get_their_names_in_the_tables(tmp_path, data_root):
    """Two settings that differ only where the column label does not look (here: rounds) once
    made one column header twice, and the report stopped in pandas' Styler with a traceback."""
    p = write_suite(tmp_path, data_root, extra="rounds = 1\n[[settings]]\nname = 'B'")
    suite = load_suite(str(p))
    assert [s.label for s in suite.settings] == ["FMNIST (5, 100%) [A]", "FMNIST (5, 100%) [B]"]
    assert [s.label for s in load_suite(str(write_suite(tmp_path, data_root, name="one"))).settings] == [
        "FMNIST (5, 100%)"]
    out = tmp_path / "out"
    run_suite(suite, out, progress=False)
    write_report(out)
    acc = (out / "accuracy.md").read_text()
    assert "FMNIST (5, 100%) [A]" in acc and "FMNIST (5, 100%) [B]" in acc
