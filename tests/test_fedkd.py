"""FedKD: SVD compression and its energy threshold, adaptive distillation loss, wire messages
(compressed both ways), server rule, partial participation, and a short real run."""
import math

import pytest
import torch

from tests.conftest import needs_fmnist
from mhpfl.config import RunConfig
from mhpfl.datasets import ClientData, Split, dataset_info
from mhpfl.engine import Client, FlopMeter, Server, Upload, message_bytes, run
from mhpfl.engine.runner import wire
from mhpfl.methods import get_method
from mhpfl.methods.fedkd import adaptive_kd_loss
from mhpfl.methods.lowrank import apply, compress, energy_threshold, energy_rank
from mhpfl.models import build_model

INFO = dataset_info("fmnist")
MENTEE = {n: tuple(t.shape) for n, t in build_model("cnn5", INFO.in_shape, 10).state_dict().items()}
DENSE = 525_258 * 4


def fake_client(cid, arch, cfg, meter, n=32):
    g = torch.Generator().manual_seed(100 + cid)

    def split(k):
        return Split(torch.randn(k, *INFO.in_shape, generator=g), torch.randint(0, 10, (k,), generator=g))

    return Client(cid, arch, ClientData(split(n), split(4), split(8), list(range(10))), split(0), INFO,
                  cfg, meter, "fedkd")


def test_energy_threshold_rises_linearly_from_start_to_end():
    assert energy_threshold(20, 20, 0.95, 0.98) == pytest.approx(0.98)
    assert energy_threshold(1, 20, 0.95, 0.98) == pytest.approx(0.95 + 0.03 / 20)
    assert energy_threshold(10, 20, 0.95, 0.98) == pytest.approx(0.965)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.98])
def test_svd_reconstruction_error_respects_the_energy_threshold(energy):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(120, 6, generator=g) @ torch.randn(6, 90, generator=g) + 0.05 * torch.randn(120, 90, generator=g)
    msg = compress({"w": m}, energy, {"w": m})
    k = msg["w.S"].numel()
    assert msg["w.U"].shape == (120, k) and msg["w.V"].shape == (k, 90)
    assert message_bytes(msg) == 4 * k * (120 + 90 + 1) < 4 * m.numel()
    rec = apply(msg, {"w": torch.zeros_like(m)})["w"]
    rel = float(((rec - m) ** 2).sum() / (m ** 2).sum())
    assert rel <= 1 - energy + 1e-6
    s = torch.linalg.svd(m.double()).S
    assert float((s[:k - 1] ** 2).sum() / (s ** 2).sum()) <= energy  # k is the smallest such rank
    assert energy_rank(torch.zeros(5), 0.0, energy) == 0


def test_dense_when_factors_would_not_be_smaller():
    g = torch.Generator().manual_seed(1)
    m, b = torch.randn(10, 12, generator=g), torch.randn(10, generator=g)  # full rank needed
    msg = compress({"w": m, "b": b}, 0.99, {"w": m + 1, "b": b + 1})
    assert set(msg) == {"w", "b"}  # absolute values, sent whole
    assert torch.equal(msg["w"], m + 1) and torch.equal(msg["b"], b + 1)


def test_adaptive_mutual_distillation_loss():
    g = torch.Generator().manual_seed(2)
    t_logits, s_logits = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t_rep, s_rep = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    out = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y)

    def ce(z):
        return float(-z.log_softmax(1)[torch.arange(4), y].mean())

    def kl(p, q):  # KL(softmax p || softmax q), by hand
        p, q = p.softmax(1), q.softmax(1)
        return float((p * (p.log() - q.log())).sum(1).mean())

    ce_t, ce_s, mse = ce(t_logits), ce(s_logits), float(((s_rep - t_rep) ** 2).mean())
    scale = ce_t + ce_s
    assert float(out["mentor"]) == pytest.approx(ce_t + (kl(s_logits, t_logits) + mse) / scale, rel=1e-5)
    assert float(out["mentee"]) == pytest.approx(ce_s + (kl(t_logits, s_logits) + mse) / scale, rel=1e-5)
    # adaptive: the same disagreement weighs less when the task losses are larger
    y_bad = torch.tensor([2, 0, 1, 0])
    bad = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y_bad)
    bad_scale = float(bad["ce_t"] + bad["ce_s"])
    distil = float(out["total"] - out["ce_t"] - out["ce_s"])
    distil_bad = float(bad["total"] - bad["ce_t"] - bad["ce_s"])
    assert distil_bad * bad_scale == pytest.approx(distil * scale, rel=1e-5)
    # the projection applies to the mentee's hidden state
    proj = torch.nn.Linear(5, 5).requires_grad_(False)
    with_proj = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y, proj)
    assert float(with_proj["hidden"]) == pytest.approx(float(((proj(s_rep) - t_rep) ** 2).mean()), rel=1e-5)


def test_loss_variants_scale_and_gradient_flow():
    g = torch.Generator().manual_seed(3)
    t_logits, s_logits = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t_rep, s_rep = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    base = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y)
    mean = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y, kl="mean")
    assert float(mean["kl_t"]) == pytest.approx(float(base["kl_t"]) / 3, rel=1e-5)  # a further 1/C
    flat = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y, adaptive=False)
    assert float(flat["mentor"]) == pytest.approx(float(base["ce_t"] + base["kl_t"] + base["hidden"]), rel=1e-5)
    nohid = adaptive_kd_loss(t_logits, t_rep, s_logits, s_rep, y, hidden=False)
    assert float(nohid["hidden"]) == 0.0

    def mentor_grad(**kw):  # gradient of the total wrt the mentor's logits
        t = t_logits.clone().requires_grad_(True)
        adaptive_kd_loss(t, t_rep, s_logits, s_rep, y, **kw)["total"].backward()
        return t.grad

    # one-way with a constant factor: the mentor gets exactly its CE gradient
    t = t_logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(t, y).backward()
    torch.testing.assert_close(mentor_grad(mentor_distill=False, scale_grad=False), t.grad)
    # with the factor's gradient (official code), the mentor is also pushed by 1/(CE_t + CE_s)
    assert not torch.allclose(mentor_grad(mentor_distill=False), t.grad)


def one_round(method, server, clients, r):
    server.start_round(r)
    downs, ups = {}, []
    for c in clients:
        downs[c.cid] = wire(method.server_message(server, c.cid, "round"), "fedkd", "server")
        c.start_update(r, "round")
        up = wire(method.client_update(c, downs[c.cid], "round"), "fedkd", "client")
        ups.append(Upload(c.cid, c.num_train, up))
    method.aggregate(server, ups, "round")
    return downs, ups


def check_compressed(msg, energy=None, update=None):
    for n, shape in MENTEE.items():
        if n in msg:
            assert tuple(msg[n].shape) == shape
        else:
            u, s, v = msg[n + ".U"], msg[n + ".S"], msg[n + ".V"]
            k = s.numel()
            assert u.shape == (shape[0], k) and v.shape[0] == k and shape[0] * v.shape[1] == math.prod(shape)
            assert k * (u.shape[0] + v.shape[1] + 1) < math.prod(shape)


def test_messages_are_compressed_both_ways_and_clients_track_the_global_mentee():
    cfg = RunConfig(method="fedkd", clients=3, rounds=4, batch_size=16)
    method, meter = get_method("fedkd")(), FlopMeter()
    clients = [fake_client(i, a, cfg, meter) for i, a in enumerate(["cnn1", "cnn2", "cnn3"])]
    for c in clients:
        method.init_client(c)
    server = Server(cfg, INFO, 0)
    method.init_server(server)
    g0 = {n: t.clone() for n, t in server.state["global_"].items()}

    # round 1 (clients 0, 1): first contact, the whole mentee goes down uncompressed
    downs, ups = one_round(method, server, clients[:2], 1)
    for c in clients[:2]:
        assert {n: tuple(t.shape) for n, t in downs[c.cid].items()} == MENTEE
        assert message_bytes(downs[c.cid]) == DENSE
        assert all(torch.equal(downs[c.cid][n], g0[n]) for n in g0)
    energy = energy_threshold(1, 4, 0.95, 0.98)
    for c, up in zip(clients[:2], ups):
        check_compressed(up.message)
        assert message_bytes(up.message) < DENSE  # the update is low-rank after one local pass
        # the server's reconstruction is within the energy bound of the client's trained mentee
        trained = c.state["mentee"].state_dict()
        rec = apply(up.message, g0)
        for n in g0:
            err = float(((rec[n] - trained[n]) ** 2).sum())
            assert err <= (1 - energy) * float(((trained[n] - g0[n]) ** 2).sum()) + 1e-10
    step = server.state["steps"][0]
    g1 = server.state["global_"]

    # round 2 (clients 0 and 2): client 0 gets exactly the server's compressed step; client 2,
    # new, gets the whole current mentee; both then hold the global mentee
    downs, _ = one_round(method, server, [clients[0], clients[2]], 2)
    d0 = downs[0]
    check_compressed(d0)
    assert set(d0) == set(step)
    assert all(torch.equal(d0[k], step[k]) for k in d0 if k.endswith((".U", ".S", ".V")))
    assert all(torch.equal(d0[n], g1[n]) for n in MENTEE if n in d0)
    assert message_bytes(d0) < DENSE and message_bytes(downs[2]) == DENSE
    for c in (clients[0], clients[2]):
        assert all(torch.allclose(c.state["synced"][n], g1[n], atol=1e-6) for n in g1)

    # round 3 (client 1, which missed round 2): it catches up on both steps at once
    g2 = {n: t.clone() for n, t in server.state["global_"].items()}
    downs, _ = one_round(method, server, [clients[1]], 3)
    check_compressed(downs[1])
    assert 0 < message_bytes(downs[1]) < DENSE
    assert all(torch.allclose(clients[1].state["synced"][n], g2[n], atol=1e-5) for n in g2)


def test_server_averages_updates_then_recompresses():
    cfg = RunConfig(method="fedkd", clients=2, rounds=2)
    shape = (6, 4)

    def rank1(i, scale):
        u, v = torch.zeros(6, 1), torch.zeros(1, 4)
        u[i, 0], v[0, i] = 1.0, 1.0
        return {"w.U": u, "w.S": torch.tensor([scale]), "w.V": v}

    for weighting, expect in (("uniform", (1.5, 1.5)), ("samples", (0.75, 2.25))):
        method = get_method("fedkd")(weighting=weighting)
        server = Server(cfg, INFO, 0)
        server.state.update(global_={"w": torch.ones(shape), "b": torch.zeros(2)}, version=0, steps={},
                            held={0: 0, 1: 0}, dense_bytes=4 * 26)
        server.start_round(1)
        # equal-energy rank-1 updates: the mean keeps both components at this threshold
        ups = [Upload(0, 1, {**rank1(0, 3.0), "b": torch.tensor([2.0, 0.0])}),
               Upload(1, 3, {**rank1(1, 3.0), "b": torch.tensor([0.0, 4.0])})]
        method.aggregate(server, ups, "round")
        want = torch.ones(shape)
        want[0, 0] += expect[0]
        want[1, 1] += expect[1]
        w = server.state["global_"]["w"]
        assert torch.allclose(w, want, atol=1e-6), (weighting, w)
        wb = (0.5, 0.5) if weighting == "uniform" else (0.25, 0.75)
        assert torch.allclose(server.state["global_"]["b"], torch.tensor([2.0 * wb[0], 4.0 * wb[1]]))
        assert server.state["version"] == 1 and set(server.state["steps"]) == {0}


@needs_fmnist
def test_short_real_run_beats_chance(tiny_cfg):
    cfg = tiny_cfg("fedkd")
    rows = []
    s = run(cfg, out=None, progress=False, on_round=rows.append)
    assert s["client_archs"] == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    assert s["best_mean_acc"] > 65.0  # K=2 classes per client: chance is ~50%
    assert rows[1]["bytes_down"] == cfg.clients * DENSE  # first contact: the whole mentee
    assert 0 < rows[2]["bytes_down"] < cfg.clients * DENSE  # then compressed updates
    assert all(0 < r["bytes_up"] < cfg.clients * DENSE for r in rows[1:])
    assert "fedkd-proj" in s["flops_per_sample"]
