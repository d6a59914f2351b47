"""`mhpfl bench --executor ray` on a real local Ray instance (2 CPUs, loopback, no dashboard):
the smoke suite gives the same runs and report as the local executor; a dying worker is
retried and, when it keeps dying, reported without losing the other runs; one-line errors."""
from __future__ import annotations

import json
import os
import sys

import pandas as pd
import pytest

from mhpfl.telemetry import telemetry_off

telemetry_off()
ray = pytest.importorskip("ray")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mhpfl.benchmark.ray_executor import RayOptions, connect  # noqa: E402
from mhpfl.benchmark.report import write_report  # noqa: E402
from mhpfl.benchmark.runner import run_suite  # noqa: E402
from mhpfl.benchmark.suite import load_suite  # noqa: E402
from mhpfl.cli import main  # noqa: E402
from mhpfl.errors import UserError  # noqa: E402
from mhpfl.methods import Method, register, unregister  # noqa: E402
from tests.conftest import needs_fmnist, strip_timing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# the smoke suite, shortened for CI: every method and both settings, 5 clients, 1 round
SMOKE_CI = {"rounds": 1, "clients": 5, "eval_every": 1}
TABLES = ("accuracy.md", "accuracy.csv", "accuracy.tex", "cost.md", "cost.csv", "cost.tex", "headline.md")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module, started by the executor's own `connect`."""
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    started = connect(ray, RayOptions(init_kwargs={"num_cpus": 2}))
    yield
    if started:
        ray.shutdown()


def _runs(out):
    """Each run's summary (minus wall time), rounds (minus wall time) and run record, as canonical
    text (NaN, e.g. the participated mean before round 1, compares equal to itself)."""
    res = {}
    for d in sorted((out / "runs").iterdir()):
        s = strip_timing(json.loads((d / "summary.json").read_text()))
        rounds = pd.read_csv(d / "rounds.csv").drop(columns=["wall_seconds"])
        res[d.name] = {"summary": s, "rounds": rounds.to_dict("list"),
                       "run.json": json.loads((d / "run.json").read_text())}
    return res


def _text(x) -> str:
    return json.dumps(x, sort_keys=True)


@needs_fmnist
def test_ray_executor_gives_the_local_executors_runs_and_report(tmp_path, data_root, local_ray, capsys):
    suite = load_suite("smoke", overrides={**SMOKE_CI, "data_root": data_root, "download": False})
    local, viaray = tmp_path / "local", tmp_path / "ray"
    res_l = run_suite(suite, local, jobs=2, threads=1, progress=False)
    res_r = run_suite(suite, viaray, progress=False, executor="ray", ray=RayOptions(run_cpus=1))
    assert res_l.failed == [] and res_r.failed == []
    assert res_r.trained == res_l.trained == len(suite.runs())
    runs_l, runs_r = _runs(local), _runs(viaray)
    assert list(runs_l) == list(runs_r)
    for name in runs_l:  # summaries (minus wall time), every round's numbers, run records
        for part, x in runs_l[name].items():
            y = runs_r[name][part]
            assert _text(x) == _text(y), (name, part, sorted(k for k in x if _text(x[k]) != _text(y.get(k))))
    write_report(local, do_plots=False)
    write_report(viaray, do_plots=False)
    for f in TABLES:
        assert (local / f).read_text() == (viaray / f).read_text(), f
    # where each run ran and how long, in the session record and on the console
    session = json.loads((viaray / "bench.json").read_text())["sessions"][-1]
    assert session["executor"] == "ray" and session["cluster"]["CPU"] == 2
    assert {p["run"] for p in session["placement"]} == {e.run_id for e in suite.runs().values()}
    assert all(p["host"] and p["seconds"] > 0 for p in session["placement"])
    assert "where the runs ran:" in capsys.readouterr().out
    # cached: nothing is redone, whichever executor finished the runs
    again = run_suite(suite, viaray, progress=False, executor="ray")
    assert (again.trained, again.cached) == (0, len(suite.runs()))


def _dying_method(marker: str | None):
    """A method whose worker process dies in its first client update: once (when `marker`, a
    file, does not exist yet) or always. Built in a function so Ray ships it by value."""

    class Dies(Method):
        name = "dies"
        description = "test method"

        def client_update(self, client, message, phase):
            if marker is None or not os.path.exists(marker):
                if marker is not None:
                    open(marker, "w").close()
                os._exit(1)
            client.fit(client.model.parameters(), lambda x, y: F.cross_entropy(client.model(x), y))
            return {"w": torch.zeros(3)}

    return Dies


@needs_fmnist
def test_dead_workers_are_retried_then_reported_without_losing_other_runs(tmp_path, data_root, local_ray):
    from tests._bench_util import write_suite

    register(_dying_method(str(tmp_path / "died-once")), "dies_once")
    register(_dying_method(None), "dies_always")
    try:
        suite = load_suite(str(write_suite(tmp_path, data_root, methods=("standalone", "dies_once", "dies_always"),
                                           rounds=1)))
        out = tmp_path / "out"
        res = run_suite(suite, out, progress=False, executor="ray", ray=RayOptions(max_retries=1))
        assert [e.method for e, _ in res.failed] == ["dies_always"]
        assert "after 2 attempt(s)" in res.failed[0][1]
        assert res.trained == 2 and (tmp_path / "died-once").exists()  # died once, then retried
        assert sorted(p.name.split("-")[0] for p in (out / "runs").iterdir()) == ["dies_once", "standalone"]
        assert "after 2 attempt(s)" in next((out / "failed").glob("dies_always-*.txt")).read_text()
    finally:
        unregister("dies_once")
        unregister("dies_always")


def test_a_node_without_the_data_is_named(tmp_path, local_ray):
    from tests._bench_util import write_suite

    empty = tmp_path / "empty"
    empty.mkdir()
    suite = load_suite(str(write_suite(tmp_path, str(empty), rounds=1)), overrides={"dataset": "cifar10"})
    res = run_suite(suite, tmp_path / "out", progress=False, executor="ray")
    (e, err), = res.failed
    assert err.startswith("node ") and f"has no cifar10 under {empty}" in err and "--data-root" in err
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_one_line_errors(tmp_path, data_root, local_ray, monkeypatch, capsys):
    from tests._bench_util import write_suite

    suite = load_suite(str(write_suite(tmp_path, data_root, rounds=1)))
    with pytest.raises(UserError, match="no node of the local Ray instance has that many GPUs"):
        run_suite(suite, tmp_path / "a", progress=False, executor="ray", ray=RayOptions(run_gpus=1))
    with pytest.raises(UserError, match="--device cuda with --run-gpus 0"):
        RayOptions(run_gpus=0).validate("cuda")
    # by default four runs share a GPU (docs/performance.md, "GPU"), and a CPU run reserves none
    assert RayOptions().validate("cuda") == 0.25 and RayOptions().validate("cpu") == 0
    assert RayOptions(run_gpus=1).validate("cuda") == 1
    # an address where nothing answers: a quick one-line error, not minutes of retries
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert main(["bench", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "b"), "--executor", "ray",
                 "--address", f"127.0.0.1:{port}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at --address 127.0.0.1:{port}" in err and "Traceback" not in err
    for ray_only in (["--run-gpus", "1"], ["--run-cpus", "2"], ["--max-retries", "-1"], ["--max-retries", "0"]):
        assert main(["bench", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "b"), *ray_only]) == 2
        assert "need --executor ray" in capsys.readouterr().err
    # a dry run refuses the Ray options the real run refuses
    for bad, said in ((["--max-retries", "-1"], "--max-retries must be >= 0"),
                      (["--run-cpus", "0"], "--run-cpus must be > 0"),
                      (["--run-gpus", "1.5"], "--run-gpus must be a fraction")):
        assert main(["bench", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "b"), "--executor", "ray",
                     "--dry-run", *bad]) == 2
        assert said in capsys.readouterr().err
    # Ray not installed: says exactly what to install
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["bench", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "c"), "--executor", "ray",
                 "--quiet"]) == 2
    assert "pip install 'mhpfl-bench[ray]'" in capsys.readouterr().err


def test_local_executor_does_not_import_ray():
    import subprocess

    code = ("import sys; from mhpfl.cli import main; import mhpfl.benchmark.runner, mhpfl.benchmark.cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_connect_keeps_the_sigterm_handler_of_the_cli():
    """ray.init installs a SIGTERM handler that exits silently: where mhpfl.cli's handler was in
    place (stop the suite, shut Ray down, one line saying which runs are kept), it is put back;
    without one, Ray's stays (its exit still shuts Ray down)."""
    import signal

    class FakeRay:  # what ray.init does to the driver's SIGTERM handler (ray/_private/worker.py)
        def is_initialized(self):
            return False

        def init(self, **kw):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    def cli_handler(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, cli_handler)
    try:
        assert connect(FakeRay(), RayOptions())
        assert signal.getsignal(signal.SIGTERM) is cli_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert connect(FakeRay(), RayOptions())
        assert callable(signal.getsignal(signal.SIGTERM))  # Ray's
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_during_ray_init_is_the_clis_interruption():
    """A SIGTERM that arrives while ray.init runs meets Ray's handler (sys.exit(15), silent): with
    the CLI's handler in place it becomes the CLI's Interrupted (one line, exit 143, the suite's
    finished runs counted), the half-started instance is shut down and the CLI's handler is back.
    Without the CLI's handler, Ray's exit goes through unchanged."""
    import signal
    import time

    from mhpfl.errors import Interrupted

    class FakeRay:
        shutdowns = 0

        def is_initialized(self):
            return False

        def init(self, **kw):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to Ray's handler at the next bytecode
            time.sleep(5)
            raise AssertionError("the SIGTERM was not delivered")

        def shutdown(self):
            self.shutdowns += 1

    def cli_handler(signum, frame):
        raise Interrupted(signum)

    before = signal.signal(signal.SIGTERM, cli_handler)
    try:
        ray = FakeRay()
        with pytest.raises(Interrupted) as e:
            connect(ray, RayOptions())
        assert e.value.signum == signal.SIGTERM and ray.shutdowns == 1
        assert signal.getsignal(signal.SIGTERM) is cli_handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(SystemExit) as e:
            connect(FakeRay(), RayOptions())
        assert e.value.code == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)
