"""--batch-clients: participants that share an architecture and a loss train as one vmapped
computation, with the same parameters (to float tolerance), bytes and FLOPs as one at a time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhpfl.engine.batching import Batcher, group_key
from mhpfl.engine.context import FitRun
from mhpfl.errors import NonFiniteLoss, UserError
from mhpfl.methods import BUILTIN
from tests._engine_util import SHORT, assert_same, float32_tol, play
from tests.conftest import needs_fmnist, synthetic_client

NOT_BATCHED = {"fd"}  # on CPU its distillation term branches on data (`if not mask.any()`): vmap rejects it


@needs_fmnist
@pytest.mark.parametrize("method", sorted(BUILTIN))
def test_batched_round_equals_one_at_a_time(tiny_cfg, one_thread, method):
    """Every method that uses client.fit: after a round, every client's parameters match (float32,
    one round: rounding differences only), the bytes both ways and the FLOPs are identical, and
    the steps really ran batched (except FD, which falls back to one client at a time)."""
    kw = dict(zoo="homo", train_fraction=0.02, rounds=1, method_options=SHORT.get(method, {}))
    alone = play(tiny_cfg(method, **kw), 1)
    together = play(tiny_cfg(method, batch_clients=True, **kw), 1)
    assert_same(alone[0], together[0], float32_tol(method))
    assert together[1] == alone[1] and together[2] == alone[2]
    assert alone[3] == 0
    assert (together[3] == 0) if method in NOT_BATCHED else (together[3] > 0)


@needs_fmnist
def test_fd_batches_where_host_reads_are_not_free(tiny_cfg, one_thread, monkeypatch):
    """On a GPU FD weights its distillation term by the mask instead of branching on it (no host
    read per step), which vmap takes: two rounds (the second with targets) batched match one at a
    time. Forced on CPU through `lean.host_reads_are_free`."""
    from mhpfl import lean

    monkeypatch.setattr(lean, "host_reads_are_free", lambda t: False)
    kw = dict(zoo="homo", train_fraction=0.02, rounds=2, method_options={"exclude_own": False})  # targets in round 2
    alone = play(tiny_cfg("fd", **kw), 2)
    together = play(tiny_cfg("fd", batch_clients=True, **kw), 2)
    assert together[3] > 0
    assert_same(alone[0], together[0], 3e-4)
    assert together[1:3] == alone[1:3]


@needs_fmnist
@pytest.mark.parametrize("method", ["standalone", "pfedlora", "fedkd", "fml", "fedmd", "lgfedavg"])
def test_batched_training_is_exact_in_float64(tiny_cfg, one_thread, method):
    """In float64 two rounds agree to 1e-10: the batched engine does the same arithmetic (per-client
    optimizer state across rounds, data order, gradient clipping, here engaged at 0.5), not an
    approximation. (FD, FedProto, FedGH and FedTGP put float32 tensors on the wire, which a
    float64 model cannot take; their float32 round is checked above.)"""
    kw = dict(zoo="homo", train_fraction=0.03, rounds=2, grad_clip=0.5, method_options=SHORT.get(method, {}))
    alone = play(tiny_cfg(method, **kw), 2, double=True)
    together = play(tiny_cfg(method, batch_clients=True, **kw), 2, double=True)
    assert together[3] > 0
    assert_same(alone[0], together[0], 1e-10)
    assert together[1:3] == alone[1:3]


@needs_fmnist
def test_clients_batch_only_with_their_own_architecture(tiny_cfg, one_thread):
    """Hetero zoo, 10 clients: CNN-k clients (two of each) train together, per architecture."""
    kw = dict(clients=10, train_fraction=0.02, rounds=1)
    alone = play(tiny_cfg("fedproto", **kw), 1)
    together = play(tiny_cfg("fedproto", batch_clients=True, **kw), 1)
    assert together[3] > 0
    assert_same(alone[0], together[0], 5e-5)
    assert together[1:3] == alone[1:3]


@needs_fmnist
def test_a_non_finite_loss_stops_the_batched_round_with_the_same_error(tiny_cfg, one_thread):
    cfg = dict(lr=1e12, grad_clip=0.0, zoo="homo", train_fraction=0.02)
    errors = []
    for batched in (False, True):
        with pytest.raises(NonFiniteLoss) as e:
            play(tiny_cfg("standalone", batch_clients=batched, **cfg), 1)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "standalone: loss became" in errors[1] and "on client 0 in round 1" in errors[1]


def test_a_failing_client_update_is_raised_and_no_thread_is_left():
    """An exception in one participant's update (outside fit) reaches the engine with its type;
    the participants parked in a fit are cancelled, every thread ends."""
    import threading

    clients = {i: synthetic_client("standalone", cid=i, arch="cnn5", n=16) for i in range(3)}

    def update(c):
        def go():
            c.fit(c.model.parameters(), lambda x, y: F.cross_entropy(c.model(x), y), epochs=1, batch_size=8)
            if c.cid == 1:
                raise UserError("client 1 cannot go on")
            c.fit(c.model.parameters(), lambda x, y: F.cross_entropy(c.model(x), y), epochs=1, batch_size=8)
            return c.cid
        return go

    before = threading.active_count()
    with pytest.raises(UserError, match="client 1 cannot go on"):
        Batcher().run({i: update(c) for i, c in clients.items()}, clients)
    assert threading.active_count() == before
    assert all(c.batcher is None for c in clients.values())
    assert Batcher().run({i: update(c) for i, c in clients.items() if i != 1},
                         {i: c for i, c in clients.items() if i != 1}) == {0: 0, 2: 2}


def _clients_with_an_extra_module():
    from torch import nn

    clients = {i: synthetic_client("standalone", cid=i, arch="cnn5", n=16) for i in range(2)}
    for c in clients.values():
        c.cfg = clients[0].cfg
        torch.manual_seed(c.cid)
        c.state["extra"] = c.track(nn.Linear(3, 3), in_shape=(3,))
    return clients


def test_a_parameter_the_loss_does_not_reach_is_left_alone_as_one_at_a_time():
    """A trainable parameter the loss never uses gets no gradient alone (the optimizer skips it:
    no momentum, no weight decay); batched, vmapped grad would give zeros, and weight decay
    would move it. The engine keeps autograd's None."""
    def update(c):
        def go():
            params = [*c.model.parameters(), *c.state["extra"].parameters()]
            return c.fit(params, lambda x, y: F.cross_entropy(c.model(x), y), epochs=3, batch_size=8)
        return go

    alone, together = _clients_with_an_extra_module(), _clients_with_an_extra_module()
    before = {i: [p.detach().clone() for p in c.state["extra"].parameters()] for i, c in alone.items()}
    for c in alone.values():
        update(c)()
    batcher = Batcher()
    batcher.run({i: update(c) for i, c in together.items()}, together)
    assert batcher.batched_steps > 0
    for i in alone:
        for clients in (alone, together):
            assert all(torch.equal(a, b) for a, b in zip(clients[i].state["extra"].parameters(), before[i]))
        assert_same([torch.cat([p.detach().flatten() for p in alone[i].model.parameters()])],
                    [torch.cat([p.detach().flatten() for p in together[i].model.parameters()])], 1e-5)


def test_what_a_loss_closes_over_decides_whether_fits_batch():
    """Fits batch when their losses differ only by the client's own modules, model and tensors;
    a loss reaching into client.state, or closing over a per-client Python object, runs alone."""
    a, b = (synthetic_client("standalone", cid=i, arch="cnn5") for i in (1, 2))
    b.cfg = a.cfg  # one run's clients share its configuration

    def fit(c, loss):
        return FitRun(c, c.model.parameters(), loss, epochs=1, data=None, batch_size=None, lr=None)

    def own_model(c):
        return lambda x, y: F.cross_entropy(c.model(x), y)

    def own_tensor(c):
        t = torch.zeros(10)
        return lambda x, y: F.cross_entropy(c.model(x) + t, y)

    def via_state(c):
        c.state["bias"] = torch.zeros(10)
        return lambda x, y: F.cross_entropy(c.model(x) + c.state["bias"], y)

    def per_client_object(c):
        d = {"w": 1.0}
        return lambda x, y: d["w"] * F.cross_entropy(c.model(x), y)

    assert group_key(fit(a, own_model(a))) == group_key(fit(b, own_model(b))) is not None
    assert group_key(fit(a, own_tensor(a))) == group_key(fit(b, own_tensor(b))) is not None
    assert group_key(fit(a, via_state(a))) is None
    assert group_key(fit(a, per_client_object(a))) != group_key(fit(b, per_client_object(b)))
    other = synthetic_client("standalone", cid=3, arch="cnn1")
    other.cfg = a.cfg
    assert group_key(fit(a, own_model(a))) != group_key(fit(other, own_model(other)))


def test_batch_clients_is_an_option_outside_the_run_key():
    from mhpfl.benchmark.suite import run_key
    from mhpfl.cli import _run_parser
    from mhpfl.config import RunConfig

    assert _run_parser().parse_args(["standalone", "--batch-clients"]).batch_clients is True
    assert _run_parser().parse_args(["standalone", "--no-batch-clients"]).batch_clients is False
    assert RunConfig(method="standalone").batch_clients is False
    assert run_key(RunConfig(method="standalone", batch_clients=True)) == run_key(RunConfig(method="standalone"))


def test_batch_clients_with_a_flower_app_is_a_user_error(tmp_path):
    from mhpfl.config import RunConfig
    from mhpfl.flower import write_app

    with pytest.raises(UserError, match="--batch-clients .* leave it out with --engine flower"):
        write_app(RunConfig(method="standalone", batch_clients=True, download=False), tmp_path / "app", tmp_path / "out")


@needs_fmnist
def test_the_summary_records_the_option_and_how_many_steps_ran_batched(tiny_cfg, one_thread):
    from mhpfl.engine import run

    kw = dict(zoo="homo", train_fraction=0.02, rounds=2)
    batched = run(tiny_cfg("standalone", batch_clients=True, **kw), progress=False)
    alone = run(tiny_cfg("standalone", **kw), progress=False)
    assert batched["config"]["batch_clients"] is True and batched["batched_steps"] > 0
    assert alone["config"]["batch_clients"] is False and "batched_steps" not in alone
    assert abs(batched["selected_mean_acc"] - alone["selected_mean_acc"]) < 0.5
    assert (batched["bytes_up"], batched["train_flops"]) == (alone["bytes_up"], alone["train_flops"])
