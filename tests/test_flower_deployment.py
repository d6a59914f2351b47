"""The Flower App that `mhpfl run --engine flower --flower-app` writes, submitted with `flwr run`:
to a real federation on localhost (`flower-superlink`, two `flower-supernode`s, partition ids 0
and 1 of 2), and to the SuperLink that `flwr` itself starts and manages for local simulation
(Flower's replacement for the deprecated `run_simulation`). Its bytes, FLOPs, participation and
accuracies equal the in-process engine's exactly when both run one torch thread (the ClientApps
and the in-process reference here), as the simulation test shows for every method. Loopback only;
telemetry and Flower's update check off."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhpfl.telemetry import telemetry_off

telemetry_off()
pytest.importorskip("flwr")

from mhpfl.cli import main  # noqa: E402
from mhpfl.engine import run  # noqa: E402
from tests.conftest import needs_fmnist  # noqa: E402
from tests._engine_util import small  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"process exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"port {port} never opened: {log.read_text()[-2000:]}")


def _flwr_env(tmp_path: Path, connection: str, **more: str) -> dict:
    """The environment of Flower's processes: this venv's tools, a fresh FLWR_HOME whose default
    connection is `connection` (TOML lines), one torch thread, nothing sent off the machine."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{connection}\n')
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **more}


def _write_app(tmp_path: Path, data_root: str, capsys):
    """The Flower App of two clients (one per node: in a deployment each message starts a
    ClientApp process, so keep them few) and the same run's in-process configuration."""
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        assert (BIN / tool).exists(), tool
    cfg = small("pfedlora", data_root, clients=2, partition="dirichlet:0.5", rounds=2, eval_every=2)
    args = ["run", "pfedlora", "--engine", "flower", "--flower-app", str(tmp_path / "app"), "--out",
            str(tmp_path / "deployed"), "--dataset", "fmnist", "--clients", "2", "--partition", "dirichlet:0.5", "--rounds", "2",
            "--train-fraction", "0.05", "--batch-size", "32", "--public-size", "1000", "--eval-every", "2",
            "--data-root", data_root, "--no-download"]
    assert main(args) == 0
    assert "flwr run" in capsys.readouterr().out
    return cfg


def _assert_same_as_in_process(tmp_path: Path, cfg) -> None:
    deployed = json.loads((tmp_path / "deployed" / "summary.json").read_text())
    ref = json.loads(json.dumps(run(cfg, out=tmp_path / "inprocess", progress=False)))
    assert deployed["engine"] == "flower" and set(deployed) - set(ref) == {"engine_version", "flower"}
    # what was sent and run is identical, and so is every accuracy: the ClientApps run one torch
    # thread (OMP_NUM_THREADS=1) like the in-process reference (one_thread); with 2 threads in
    # process the float sums of oneDNN's kernels differ and the accuracy moves by ~0.2 points
    for k in ("bytes_up", "bytes_down", "train_flops", "flops_per_sample", "participation", "client_archs",
              "client_train_samples", "rounds_run", "config"):
        assert deployed[k] == ref[k], k
    f = deployed["flower"]
    assert deployed["bytes_up"] == f["array_record_count_bytes_up"] - f["array_record_key_bytes_up"]
    for k in ("selected_mean_acc", "best_mean_acc", "final_mean_acc", "final_weighted_acc",
              "per_client_final_acc", "per_client_selected_acc", "selected_round"):
        assert deployed[k] == ref[k], (k, deployed[k], ref[k])


@needs_fmnist
@pytest.mark.usefixtures("one_thread")
def test_superlink_two_supernodes_and_flwr_run(tmp_path, data_root, capsys):
    cfg = _write_app(tmp_path, data_root, capsys)
    link = _free_port()
    env = _flwr_env(tmp_path, f'address = "127.0.0.1:{link}"\ninsecure = true')
    procs, logs = [], []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        sl = start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                 "--port", str(link), "--disable-runtime-dependency-installation",
                                 "--database", str(tmp_path / "state.db")])
        _wait_port(link, sl, logs[-1])
        for pid in (0, 1):
            start(f"supernode{pid}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                      f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(_free_port()),
                                      "--node-config", f"partition-id={pid} num-partitions=2"])
        done = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "test", "--stream"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        summary_file = tmp_path / "deployed" / "summary.json"
        assert summary_file.is_file(), (done.stdout[-3000:], done.stderr[-3000:],
                                        *[p.read_text()[-2000:] for p in logs])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    _assert_same_as_in_process(tmp_path, cfg)


def _stop_managed_superlinks(control_port: int) -> None:
    """The managed local SuperLink stays up after `flwr run` (Flower has no command to stop it):
    end every `flower-superlink` process of this test's control port."""
    import signal

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd) and f"127.0.0.1:{control_port}".encode() in cmd:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass


@needs_fmnist
@pytest.mark.usefixtures("one_thread")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="stopping flwr's SuperLink afterwards reads /proc")
def test_flwr_run_on_the_superlink_flower_manages_for_local_simulation(tmp_path, data_root, capsys):
    """`flwr run APP CONNECTION` where CONNECTION has `address = ":local:"`: flwr starts its own
    SuperLink, which runs the app in Flower's simulation runtime (one virtual SuperNode per
    client here, `--federation-config num-supernodes=2`). No `run_simulation` involved."""
    cfg = _write_app(tmp_path, data_root, capsys)
    control = _free_port()
    # its SuperLink `uv sync`s the App into a runtime environment: no dependencies, no network
    env = _flwr_env(tmp_path, 'address = ":local:"', FLWR_LOCAL_CONTROL_API_PORT=str(control),
                    FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), UV_OFFLINE="1")
    try:
        done = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "test", "--stream",
                               "--federation-config", "num-supernodes=2"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    finally:
        _stop_managed_superlinks(control)
    log = tmp_path / "flwr-home" / "local-superlink" / "superlink.log"
    assert (tmp_path / "deployed" / "summary.json").is_file(), (
        done.stdout[-3000:], done.stderr[-3000:], log.read_text()[-3000:] if log.exists() else "")
    assert "2 simulated SuperNodes" in done.stdout + done.stderr
    _assert_same_as_in_process(tmp_path, cfg)


def test_a_superlink_that_is_not_running_is_one_message(tmp_path):
    """`flwr run` against an address where no SuperLink listens: Flower's own one-message error,
    no traceback, nothing written (the results folder is not created)."""
    out = tmp_path / "never"
    assert main(["run", "pfedlora", "--engine", "flower", "--flower-app", str(tmp_path / "app"),
                 "--out", str(out), "--clients", "5", "--rounds", "1"]) == 0
    env = _flwr_env(tmp_path, f'address = "127.0.0.1:{_free_port()}"\ninsecure = true')
    done = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "test"], env=env,
                          capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert "SuperLink is unavailable" in " ".join(said.split()), said
    assert "Traceback" not in said and "warnings" not in said  # the app's pyproject is complete
    assert not out.exists()
