"""A real Flower federation on localhost: `flower-superlink`, two `flower-supernode`s (partition
ids 0 and 1 of 2) and `flwr run` of the Flower App that `mhpfl run --engine flower --flower-app`
writes. Its bytes, FLOPs, participation and accuracies equal the in-process engine's exactly when
both run one torch thread (the SuperNodes' ClientApps and the in-process reference here), as the
simulation test shows for every method. Loopback only; telemetry off."""
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


@needs_fmnist
@pytest.mark.usefixtures("one_thread")
def test_superlink_two_supernodes_and_flwr_run(tmp_path, data_root, capsys):
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        assert (BIN / tool).exists(), tool
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # two clients, one per SuperNode (each message starts a ClientApp process: keep them few)
    cfg = small("pfedlora", data_root, clients=2, partition="dirichlet:0.5", rounds=2, eval_every=2)
    args = ["run", "pfedlora", "--engine", "flower", "--flower-app", str(tmp_path / "app"), "--out",
            str(tmp_path / "deployed"), "--dataset", "fmnist", "--clients", "2", "--partition", "dirichlet:0.5", "--rounds", "2",
            "--train-fraction", "0.05", "--batch-size", "32", "--public-size", "1000", "--eval-every", "2",
            "--data-root", data_root, "--no-download"]
    assert main(args) == 0
    assert "flwr run" in capsys.readouterr().out
    link = _free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n")
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
        done = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "local-test", "--stream"],
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
    deployed = json.loads(summary_file.read_text())
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


def test_a_superlink_that_is_not_running_is_one_message(tmp_path):
    """`flwr run` against an address where no SuperLink listens: Flower's own one-message error,
    no traceback, nothing written (the results folder is not created)."""
    out = tmp_path / "never"
    assert main(["run", "pfedlora", "--engine", "flower", "--flower-app", str(tmp_path / "app"),
                 "--out", str(out), "--clients", "5", "--rounds", "1"]) == 0
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "dead"\n\n[superlink.dead]\n'
                                      f'address = "127.0.0.1:{_free_port()}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([str(BIN / "flwr"), "run", str(tmp_path / "app"), "dead"], env=env,
                          capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert "SuperLink is unavailable" in " ".join(said.split()), said
    assert "Traceback" not in said and "warnings" not in said  # the app's pyproject is complete
    assert not out.exists()
