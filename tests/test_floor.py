"""benchmarks/floor.py counts the FLOPs of the work its replay runs, so that the floor's training
and evaluation FLOP rates (docs/performance.md) compare like with like."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.floor import Floor, Pass
from mhpfl.engine.meter import forward_flops
from mhpfl.models import build_model
from tests.conftest import needs_fmnist

ROOT = Path(__file__).resolve().parents[1]

SHAPE = (1, 28, 28)
BATCH = 16


def _floor(model, trainable, train=True):
    return Floor([Pass(model, (BATCH, *SHAPE), train, tuple(trainable), 0)], lr=0.01, momentum=0.9,
                 weight_decay=0.0, grad_clip=10.0)


def test_floor_counts_the_backward_pass_autograd_runs():
    torch.manual_seed(0)
    model = build_model("cnn1", SHAPE, 10)
    fwd = forward_flops(model, SHAPE) * BATCH
    # inference: fvcore's forward count
    assert _floor(model, (), train=False).flops == fwd
    # everything trains: weight gradients and input gradients of every layer but the first
    full = _floor(model, model.parameters()).flops
    assert 2 * fwd < full < 3 * fwd
    # the model frozen and only its last layer trains (pFedLoRA's adapter phase, with LoRA on fc3):
    # the backward pass stops there, about one forward pass in all (the old count said 3)
    last = _floor(model, model.fc3.parameters()).flops
    assert fwd < last < 1.05 * fwd
    # counting takes no SGD step (the floor replays on a copy of the model)
    copy = _floor(model, model.parameters()).passes[0].module
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
    assert all(p.grad is None for p in copy.parameters())


@needs_fmnist
def test_round_vs_floor_runs_outside_pytest_benchmark(tmp_path):
    """`python -m benchmarks.test_round` (what the GPU check runs on CUDA) measures a method's
    engine round against its floor on any device and setting, and writes every row."""
    out = tmp_path / "rf.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.test_round", "--methods", "standalone",
                        "--train-fraction", "0.05", "--out", str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (report["device"], report["suite"], report["setting"], row["method"]) == ("cpu", "quick", "N10-C100",
                                                                                     "standalone")
    assert row["steps"] > 0 and row["engine_s"] > 0 and row["floor_s"] > 0 and row["gpu_util_pct"] is None
    from benchmarks.test_round import ROUNDS

    assert [r["round"] for r in row["per_round"]] == list(range(3, ROUNDS + 1)) and "x the floor" in p.stdout
    assert row["ratio"] == statistics.median(r["engine"] / r["floor"] for r in row["per_round"])
    assert row["engine_s"] == statistics.median(r["engine"] for r in row["per_round"])


@needs_fmnist
def test_each_timed_round_is_compared_with_the_floor_of_that_round(data_root):
    """At partial participation each round trains other clients (other architectures, other data
    sizes): the floor replayed after a round is traced from that round, so its training work is
    the round's own, FLOP for FLOP (both counted by FlopCounterMode as autograd runs them)."""
    from benchmarks.test_round import measure
    from tests._engine_util import small

    res = measure(small("standalone", data_root, clients=10, frac=0.3, rounds=6, eval_every=1))
    rounds = res["per_round"]
    assert [r["round"] for r in rounds] == [3, 4, 5, 6]
    assert all(r["train_flops"] == r["engine_train_flops"] > 0 for r in rounds)
    assert len({r["engine_train_flops"] for r in rounds}) > 1  # the rounds' work differs


@needs_fmnist
def test_the_floor_replays_the_server_training_a_method_does_by_design(data_root, monkeypatch):
    """FedTGP trains its prototype generator on the server every round (S epochs over the uploaded
    prototypes, one ACL loss a step): work by design, so each round's floor replays it, step for
    step, as part of the floor's time."""
    from benchmarks.test_round import measure
    from mhpfl.methods import fedtgp
    from tests._engine_util import small

    calls = []
    acl = fedtgp.acl_loss
    monkeypatch.setattr(fedtgp, "acl_loss", lambda *a: calls.append(1) or acl(*a))
    rounds = 5
    res = measure(small("fedtgp", data_root, clients=5, rounds=rounds, eval_every=1,
                        method_options={"server_epochs": 3}))
    # every client takes part in every round with the same classes: the same steps each round
    per_round = len(calls) // rounds
    assert per_round >= 3 and len(calls) == rounds * per_round
    for r in res["per_round"]:
        assert r["server_steps"] == per_round and r["server"] > 0
        assert r["floor"] == r["train"] + r["eval"] + r["server"] + r["svd"]
    assert res["floor_server_s"] > 0 and res["server_steps"] == per_round


def test_the_servers_passes_replay_on_their_recorded_input_and_are_not_client_flops():
    """A server pass (FedTGP's generator on the class ids it embeds) replays on its recorded
    integer input, only under replay("server"), and adds nothing to the floor's FLOPs, which are
    the clients' work as the engine meters it."""
    from mhpfl.methods.fedtgp import PrototypeGenerator

    torch.manual_seed(0)
    model, gen = build_model("cnn1", SHAPE, 10), PrototypeGenerator(10, 500)
    fl = Floor([Pass(model, (BATCH, *SHAPE), True, tuple(model.parameters())),
                Pass(gen, (10,), True, tuple(gen.parameters()), server=True, data=torch.arange(10))],
               lr=0.01, momentum=0.9, weight_decay=0.0, grad_clip=10.0)
    assert fl.flops == _floor(model, model.parameters()).flops > 0
    assert (fl.steps, fl.server_steps) == (1, 1)
    client, server = (list(p.module.parameters()) for p in fl.passes)
    before = [q.clone() for q in client + server]
    fl.replay("server")
    assert all(torch.equal(a, b) for a, b in zip(before, client))
    assert not all(torch.equal(a, b) for a, b in zip(before[len(client):], server))


def test_round_vs_floor_names_an_unknown_setting_in_one_line():
    p = subprocess.run([sys.executable, "-m", "benchmarks.test_round", "--setting", "N10"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: N10: not in the quick suite; its settings are N10-C100")
