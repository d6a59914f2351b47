"""FedMD: wire messages, consensus rule, digest/revisit step, transfer phase, a short real run."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import fit_flops, needs_fmnist
from mhpfl.models import build_model
from mhpfl.config import RunConfig
from mhpfl.datasets import ClientData, Split, dataset_info
from mhpfl.engine import Client, FlopMeter, Server, Upload, message_bytes, run
from mhpfl.engine.runner import wire
from mhpfl.errors import UserError
from mhpfl.methods import get_method

INFO = dataset_info("fmnist")


def fake_public(n=120):
    g = torch.Generator().manual_seed(7)
    return Split(torch.randn(n, *INFO.in_shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def fake_client(cid, arch, cfg, meter, public, n=40):
    g = torch.Generator().manual_seed(100 + cid)

    def split(k):
        return Split(torch.randn(k, *INFO.in_shape, generator=g), torch.randint(0, 10, (k,), generator=g))

    return Client(cid, arch, ClientData(split(n), split(4), split(8), list(range(10))), public, INFO,
                  cfg, meter, "fedmd")


def recording(client):
    """Wrap client.fit to record each call's data, epochs and batch size (then really train)."""
    calls, real = [], client.fit

    def fit(params, loss_fn, *, epochs=None, data=None, batch_size=None, lr=None):
        calls.append({"data": data, "epochs": epochs, "batch_size": batch_size, "loss_fn": loss_fn})
        return real(params, loss_fn, epochs=epochs, data=data, batch_size=batch_size, lr=lr)

    client.fit = fit
    return calls


def setup(opts, rounds=2):
    cfg = RunConfig(method="fedmd", clients=2, rounds=rounds, batch_size=16, local_epochs=2)
    method, meter, public = get_method("fedmd")(**opts), FlopMeter(), fake_public()
    clients = [fake_client(0, "cnn1", cfg, meter, public), fake_client(1, "cnn4", cfg, meter, public)]
    server = Server(cfg, INFO, len(public))
    return method, clients, server


def test_transfer_phase_runs_once_before_round_one():
    method, clients, server = setup({"public_subset": 50, "transfer_public_epochs": 2,
                                     "transfer_private_epochs": 3})
    c = clients[0]
    calls = recording(c)
    before = [p.detach().clone() for p in c.model.parameters()]
    method.init_client(c)
    assert [(k["data"], k["epochs"]) for k in calls] == [(c.public, 2), (None, 3)]  # public, then private
    assert any(not torch.equal(a, b) for a, b in zip(before, c.model.parameters()))
    method.init_client(clients[1])
    method.init_server(server)
    calls.clear()
    for r in (1, 2):
        server.start_round(r)
        for phase in method.phases:
            ups = []
            for cl in clients:
                cl.start_update(r, phase)
                ups.append(Upload(cl.cid, cl.num_train, method.client_update(
                    cl, wire(method.server_message(server, cl.cid, phase), "fedmd", "server"), phase)))
            method.aggregate(server, ups, phase)
    assert all(k["data"] is not c.public for k in calls)  # rounds never train on the whole public pool
    assert len(calls) == 4  # per round: digest + revisit


def test_messages_both_ways_and_the_digest_step():
    method, clients, server = setup({"public_subset": 50, "transfer_public_epochs": 0,
                                     "transfer_private_epochs": 0})
    for c in clients:
        method.init_client(c)
    method.init_server(server)
    server.start_round(1)
    subsets, uploads = [], []
    for c in clients:
        down = wire(method.server_message(server, c.cid, "communicate"), "fedmd", "server")
        assert set(down) == {"subset"} and down["subset"].dtype == torch.int64
        assert down["subset"].shape == (50,) and message_bytes(down) == 50 * 8
        idx = down["subset"]
        assert len(set(idx.tolist())) == 50 and 0 <= int(idx.min()) and int(idx.max()) < 120
        subsets.append(idx)
        c.start_update(1, "communicate")
        up = wire(method.client_update(c, down, "communicate"), "fedmd", "client")
        assert set(up) == {"scores"} and up["scores"].shape == (50, 10)
        assert up["scores"].dtype == torch.float32 and message_bytes(up) == 50 * 10 * 4
        c.model.eval()
        assert torch.allclose(up["scores"], c.model(c.public.x[idx]), atol=1e-5)  # logits on the subset
        uploads.append(Upload(c.cid, c.num_train, up))
    assert torch.equal(subsets[0], subsets[1])  # one subset per round for everyone
    method.aggregate(server, uploads, "communicate")
    c = clients[0]
    down = wire(method.server_message(server, c.cid, "digest"), "fedmd", "server")
    assert set(down) == {"consensus"} and down["consensus"].shape == (50, 10)
    assert message_bytes(down) == 50 * 10 * 4
    calls = recording(c)
    c.start_update(1, "digest")
    assert method.client_update(c, down, "digest") == {}
    digest, revisit = calls
    assert digest["epochs"] == 1 and digest["batch_size"] == 256
    assert torch.equal(digest["data"].x, c.public.x[subsets[0]])
    assert torch.equal(digest["data"].y, down["consensus"])
    x, t = digest["data"].x[:5], digest["data"].y[:5]
    assert torch.allclose(digest["loss_fn"](x, t), F.l1_loss(c.model(x), t))  # MAE on logits
    assert revisit["data"] is None and revisit["epochs"] == 2  # private data, --local-epochs
    # the next round draws a fresh subset, reproducibly
    server.start_round(2)
    nxt = method.server_message(server, 0, "communicate")["subset"]
    assert not torch.equal(nxt, subsets[0])
    server.start_round(2)
    server.state.pop("subset_round")
    assert torch.equal(method.server_message(server, 1, "communicate")["subset"], nxt)


def test_consensus_is_the_plain_mean():
    method, _, server = setup({})
    method.init_server(server)
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    method.aggregate(server, [Upload(0, 1, {"scores": a}), Upload(1, 9, {"scores": b})], "communicate")
    assert torch.equal(method.server_message(server, 0, "digest")["consensus"], torch.tensor([[2.0, 0.0]]))


def test_needs_a_public_pool():
    cfg = RunConfig(method="fedmd", clients=2)
    with pytest.raises(UserError, match="public-size"):
        get_method("fedmd")().init_server(Server(cfg, INFO, 0))
    with pytest.raises(UserError, match="public-subset"):
        get_method("fedmd")(public_subset=0)


@needs_fmnist
def test_short_real_run_beats_chance(tiny_cfg):
    cfg = tiny_cfg("fedmd", public_size=4000, method_options={
        "public_subset": 100, "transfer_public_epochs": 2, "transfer_private_epochs": 1})
    rows = []
    s = run(cfg, out=None, progress=False, on_round=rows.append)
    assert s["client_archs"] == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    assert s["best_mean_acc"] > 65.0  # K=2 classes per client: chance is ~50%
    n, sub, c = cfg.clients, 100, 10
    assert [r["bytes_up"] for r in rows] == [0] + [n * sub * c * 4] * cfg.rounds
    assert [r["bytes_down"] for r in rows] == [0] + [n * (sub * 8 + sub * c * 4)] * cfg.rounds
    # round 1 holds each client's transfer learning (2 epochs on the public pool, 1 on private
    # data: it joins in round 1), then scores on the subset, digest and revisit; round 0 nothing
    fl, b = s["flops_per_sample"], cfg.batch_size
    models = {a: build_model(a, (1, 28, 28), 10) for a in fl}
    expected = sum(fit_flops(models[a], 200, b, 2) + fit_flops(models[a], k, b, 2)
                   + fit_flops(models[a], sub, 256) + sub * fl[a]
                   for a, k in zip(s["client_archs"], s["client_train_samples"]))
    assert rows[0]["train_flops"] == 0 and rows[1]["train_flops"] == expected
