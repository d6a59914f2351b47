"""The command line as a user meets it: one-line errors, plugins, outputs."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import needs_fmnist
from mhpfl.datasets.loaders import DEBIAN_FMNIST


def mhpfl(*args, env=None, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mhpfl.cli", *args], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=600)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0]


def test_list_shows_methods_datasets_zoos():
    p = mhpfl("list")
    assert p.returncode == 0
    for word in ("standalone", "fedavg", "pfedlora", "fmnist", "cifar10", "cifar100", "hetero", "homo"):
        assert word in p.stdout


def test_run_help_documents_method_options():
    p = mhpfl("run", "pfedlora", "--help")
    assert p.returncode == 0 and "--rank" in p.stdout and "pfedlora options" in p.stdout
    from mhpfl.datasets.loaders import DATASETS

    flat = " ".join(p.stdout.split())
    assert all(f" {name} " in flat for name in DATASETS), flat  # --dataset names every loader


@pytest.mark.parametrize("args,needles", [
    (["run", "nosuch"], ["unknown method 'nosuch'"]),
    (["run", "standalone", "--frac", "0"], ["--frac"]),
    (["run", "standalone", "--clients", "7"], ["divisible"]),
    (["run", "standalone", "--partition", "pathological:20"], ["K <= 10"]),
    (["run", "fedavg"], ["--zoo homo"]),
    (["run", "standalone", "--device", "cuda"], ["--device cpu"]),
    (["run", "standalone", "--rounds", "0"], ["--rounds"]),
])
def test_user_errors_are_one_line(args, needles):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    assert_one_line_error(mhpfl(*args), *needles)


def test_unwritable_out_is_one_line(tmp_path, data_root):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = mhpfl("run", "standalone", "--rounds", "1", "--data-root", data_root, "--no-download",
              "--out", str(blocker / "sub"))
    assert_one_line_error(p, "cannot write to --out")


def test_missing_cifar_names_the_file_and_directory(tmp_path):
    p = mhpfl("run", "standalone", "--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download",
              "--rounds", "1", "--out", str(tmp_path / "out"))
    assert_one_line_error(p, "cifar-10-python.tar.gz", str(tmp_path))


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist to stage from")
def test_a_data_root_fashion_mnist_cannot_be_staged_into_is_one_line(tmp_path):
    """Debian's Fashion-MNIST is decompressed into the data root; where that cannot be written
    (a read-only root; here a file where its folder must go, which root cannot write past
    either) the run stops with one line, not an OSError traceback."""
    (tmp_path / "FashionMNIST").write_text("")
    p = mhpfl("run", "standalone", "--data-root", str(tmp_path), "--no-download", "--rounds", "1",
              "--out", str(tmp_path / "out"))
    assert_one_line_error(p, "cannot decompress Debian's Fashion-MNIST into", "--data-root")
    assert (tmp_path / "FashionMNIST").is_file() and not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("damage", [b"not gzip at all", "truncated"])
def test_a_damaged_debian_package_file_is_named_not_blamed_on_the_data_root(tmp_path, monkeypatch, damage):
    """A damaged .gz in Debian's package (not an unwritable data root) says to reinstall it."""
    import gzip

    from mhpfl.datasets import loaders
    from mhpfl.errors import UserError

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for f in loaders.FMNIST_FILES:
        (pkg / f"{f}.gz").write_bytes(gzip.compress(b"x" * 1000))
    bad = pkg / f"{loaders.FMNIST_FILES[0]}.gz"
    bad.write_bytes(bad.read_bytes()[:20] if damage == "truncated" else damage)
    monkeypatch.setattr(loaders, "DEBIAN_FMNIST", pkg)
    with pytest.raises(UserError, match="is damaged .*apt-get install --reinstall dataset-fashion-mnist"):
        loaders._stage_debian_fmnist(tmp_path / "root")
    assert not [p for p in (tmp_path / "root").rglob("*.tmp")]  # no half-written file left


PLUGIN = textwrap.dedent('''
    import torch.nn.functional as F
    from mhpfl.engine import weighted_average
    from mhpfl.methods import Method, Option

    class SharedHead(Method):
        """Throwaway plugin: clients train locally and share only their classifier."""
        name = "sharedhead"
        description = "test plugin: share the fc3 classifier"
        options = {"scale": Option(1.0, "loss scale")}

        def client_update(self, client, message, phase):
            if message:
                client.model.fc3.load_state_dict(message)
            m = client.model
            client.fit(m.parameters(), lambda x, y: self.scale * F.cross_entropy(m(x), y))
            return dict(m.fc3.state_dict())

        def init_server(self, server):
            server.state["head"] = {}

        def server_message(self, server, cid, phase):
            return server.state["head"]

        def aggregate(self, server, uploads, phase):
            server.state["head"] = weighted_average(uploads)

    class Raiser(SharedHead):
        description = "test plugin: a bug in a hook"

        def client_update(self, client, message, phase):
            raise RuntimeError("boom in client_update")

    class NoDescription(Method):
        def client_update(self, client, message, phase):
            return {}

    class NoUpdate(Method):
        description = "test plugin: no client_update"

    class BadInterval(SharedHead):
        options = {"scale": Option(1.0, "loss scale", interval="[a, b]")}
''')


def install_plugin(root, entry_points):
    """Register a distribution the way pip would: a .dist-info with entry_points.txt on sys.path."""
    (root / "plugdemo.py").write_text(PLUGIN)
    info = root / "plugdemo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugdemo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mhpfl.methods]\n" + entry_points)
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


@needs_fmnist
def test_third_party_plugin_is_listed_and_runs(tmp_path, data_root):
    env = install_plugin(tmp_path, "sharedhead = plugdemo:SharedHead\n")
    p = mhpfl("list", env=env)
    assert "sharedhead" in p.stdout and "share the fc3 classifier" in p.stdout
    out = tmp_path / "run"
    p = mhpfl("run", "sharedhead", "--clients", "5", "--rounds", "2", "--train-fraction", "0.05",
              "--data-root", data_root, "--no-download", "--scale", "1.0", "--quiet", "--out", str(out), env=env)
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "sharedhead"
    assert s["bytes_up"] == 2 * 5 * 4 * (500 * 10 + 10)
    assert s["best_mean_acc"] > 60


def test_broken_plugin_is_reported_not_fatal(tmp_path):
    env = install_plugin(tmp_path, "broken = plugdemo_missing:Nothing\n")
    p = mhpfl("list", env=env)
    assert p.returncode == 0 and "pfedlora" in p.stdout and "BROKEN PLUGIN" in p.stdout
    assert_one_line_error(mhpfl("run", "broken", env=env), "plugdemo", "failed to load")


def test_a_plugin_class_that_cannot_run_is_named_and_the_rest_are_listed(tmp_path):
    env = install_plugin(tmp_path, "nodesc = plugdemo:NoDescription\nnoupdate = plugdemo:NoUpdate\n"
                                   "badopt = plugdemo:BadInterval\nsharedhead = plugdemo:SharedHead\n")
    p = mhpfl("list", env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    listed = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("  ")}
    assert "no one-line `description`" in listed["nodesc"] and "BROKEN PLUGIN" in listed["nodesc"]
    assert "does not define client_update" in listed["noupdate"]
    assert "interval '[a, b]'" in listed["badopt"]
    assert "share the fc3 classifier" in listed["sharedhead"] and "pfedlora" in listed
    assert_one_line_error(mhpfl("run", "noupdate", env=env), "plugdemo", "does not define client_update",
                          "fix or uninstall")


@needs_fmnist
def test_a_plugin_hook_that_raises_is_one_line_naming_the_plugin(tmp_path, data_root):
    env = install_plugin(tmp_path, "raiser = plugdemo:Raiser\n")
    p = mhpfl("run", "raiser", "--clients", "5", "--rounds", "1", "--train-fraction", "0.05", "--data-root",
              data_root, "--no-download", "--quiet", "--out", str(tmp_path / "run"), env=env)
    assert_one_line_error(p, "method 'raiser' (a plugin: plugdemo) raised RuntimeError: boom in client_update",
                          "fix or uninstall")
    trace = Path(p.stderr.split("(traceback in ", 1)[1].split(")", 1)[0])
    assert "Traceback" in trace.read_text() and "client_update" in trace.read_text()
    trace.unlink()


@needs_fmnist
def test_an_error_mid_run_ends_the_progress_bar_line_first(tmp_path, data_root):
    """With the progress bar on, the one-line error starts its own line and no bar is redrawn
    after it (the bar is closed on any error, Ctrl-C included)."""
    p = mhpfl("run", "standalone", "--clients", "5", "--rounds", "3", "--train-fraction", "0.05", "--lr", "1e12",
              "--grad-clip", "0", "--data-root", data_root, "--no-download", "--out", str(tmp_path / "run"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.rstrip("\n").split("\n")
    assert "standalone fmnist" in p.stderr and "Traceback" not in p.stderr  # the bar was drawn
    assert lines[-1].startswith("error: standalone: loss became "), p.stderr
    assert all("error" not in line for line in lines[:-1]), p.stderr


def test_an_unexpected_error_is_one_line_with_the_traceback_kept(capsys, monkeypatch):
    """A bug (ours or a plugin's) in any command: one line, exit 1, the traceback in a file."""
    from mhpfl import cli

    def broken(argv):
        raise ValueError("a\nmultiline\nmessage")

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected ValueError: a multiline message (")
    assert "this is a bug in mhpfl or in a plugin" in err
    trace = Path(err.split("(traceback in ", 1)[1].split(")", 1)[0])
    assert "Traceback" in trace.read_text() and "broken" in trace.read_text()
    trace.unlink()


@needs_fmnist
def test_sigterm_stops_a_run_with_one_line(tmp_path, data_root):
    """kill / timeout during `mhpfl run`: one line, exit 143, and nothing that reads as a result."""
    import signal

    from tests.conftest import sigterm_cli

    out = tmp_path / "run"
    rc, lines, _ = sigterm_cli(["run", "standalone", "--clients", "5", "--rounds", "500", "--train-fraction",
                                "0.05", "--eval-every", "1", "--data-root", data_root, "--no-download", "--quiet",
                                "--out", str(out)], ready=(out / "rounds.csv").exists)
    assert rc == 128 + signal.SIGTERM and len(lines) == 1, lines
    assert lines[0].startswith("error: interrupted by SIGTERM; the run stopped before its last round")
    assert not (out / "summary.json").exists()
