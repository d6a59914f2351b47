"""FedTGP: prototypes up, generator-made global prototypes (adaptive-margin contrastive) down."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import needs_fmnist, one_pass_fit, synthetic_client, synthetic_server
from mhpfl.datasets import dataset_info
from mhpfl.engine import Upload, message_bytes, run
from mhpfl.errors import UserError
from mhpfl.methods import get_method
from mhpfl.methods.fedtgp import acl_loss, adaptive_margin
from mhpfl.models import REP_DIM

C = dataset_info("fmnist").num_classes


def test_upload_is_unweighted_class_means_after_training():
    m = get_method("fedtgp")()
    client = synthetic_client("fedtgp", 1, "cnn2", (2, 7, 7), 12)
    m.init_client(client)
    client.start_update(1, "round")
    up = m.client_update(client, {}, "round")
    assert list(up) == ["protos", "labels"] and up["labels"].tolist() == [2, 7]
    assert message_bytes(up) == 2 * (4 * REP_DIM + 8)
    with torch.no_grad():
        _, rep = client.model(client.data.train.x, return_rep=True)
    y = client.data.train.y
    torch.testing.assert_close(up["protos"], torch.stack([rep[y == 2].mean(0), rep[y == 7].mean(0)]))


def test_local_loss_is_ce_plus_ten_times_mse(monkeypatch):
    m = get_method("fedtgp")()
    assert m.ld == 10.0
    client = synthetic_client("fedtgp", 1, "cnn3", (2, 7), 12)
    m.init_client(client)
    losses = []
    monkeypatch.setattr(client, "fit", one_pass_fit(client, losses))
    monkeypatch.setattr(client, "infer", lambda fn, data: fn(data.x).detach())
    glob = torch.randn(C, REP_DIM)
    m.client_update(client, {"protos": glob, "labels": torch.arange(C)}, "round")
    with torch.no_grad():
        logits, rep = client.model(client.data.train.x, return_rep=True)
    y = client.data.train.y
    torch.testing.assert_close(losses[0], F.cross_entropy(logits, y) + 10 * F.mse_loss(rep, glob[y]))


def test_adaptive_margin_is_the_largest_nearest_class_gap_capped_by_tau():
    p = torch.zeros(4, REP_DIM)
    p[1, 0], p[2, 0], p[3, 0] = 2.0, 3.0, 10.0  # class means: 0 -> 1.0 (two uploads), 5 -> 3, 9 -> 10
    y = torch.tensor([0, 0, 5, 9])
    # nearest-other distances: class 0: 2, class 5: 2, class 9: 7
    assert adaptive_margin(p, y, C, tau=100.0) == pytest.approx(7.0)
    assert adaptive_margin(p, y, C, tau=4.0) == pytest.approx(4.0)
    assert adaptive_margin(p[:2], y[:2], C, tau=4.0) == 4.0  # one class only: tau


def test_acl_loss_adds_the_margin_to_the_true_class_distance():
    gen = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    p = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([0])
    # distances 0 and 5; with margin 2 the logits are -2 and -5
    expect = F.cross_entropy(torch.tensor([[-2.0, -5.0]]), y)
    torch.testing.assert_close(acl_loss(gen, p, y, 2.0), expect, atol=1e-5, rtol=1e-5)


def test_server_trains_the_generator_and_sends_all_global_prototypes():
    m = get_method("fedtgp")(server_epochs=20)
    server = synthetic_server("fedtgp")
    m.init_server(server)
    assert m.server_message(server, 0, "round") == {}
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, REP_DIM, generator=g)
    ups = [Upload(k, 10, {"protos": centers + 0.1 * torch.randn(3, REP_DIM, generator=g),
                          "labels": torch.tensor([1, 4, 6])}) for k in range(3)]
    gen = server.state["gen"]
    classes = torch.arange(C)
    p = torch.cat([u.message["protos"] for u in ups])
    y = torch.cat([u.message["labels"] for u in ups])
    margin = adaptive_margin(p, y, C, m.tau)
    assert 0 < margin < m.tau
    before = [q.detach().clone() for q in gen.parameters()]
    with torch.no_grad():
        loss0 = acl_loss(gen(classes), p, y, margin)
    m.aggregate(server, ups, "round")
    assert all(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))
    with torch.no_grad():
        loss1 = acl_loss(gen(classes), p, y, margin)
        out = gen(classes)
    assert loss1 < loss0 and server.state["margin"] == pytest.approx(margin)
    down = m.server_message(server, 2, "round")
    assert down["labels"].tolist() == list(range(C)) and message_bytes(down) == C * (4 * REP_DIM + 8)
    torch.testing.assert_close(down["protos"], out)
    # the nearest generated prototype of each uploaded class's center is that class's
    near = torch.cdist(centers, down["protos"]).argmin(1)
    assert near.tolist() == [1, 4, 6]


def test_seeded_server_is_reproducible():
    outs = []
    for _ in range(2):
        m = get_method("fedtgp")(server_epochs=3)
        server = synthetic_server("fedtgp")
        m.init_server(server)
        m.aggregate(server, [Upload(0, 1, {"protos": torch.ones(2, REP_DIM), "labels": torch.tensor([0, 1])})], "round")
        outs.append(m.server_message(server, 0, "round")["protos"])
    assert torch.equal(*outs)


def test_bad_options():
    for bad in ({"ld": -1.0}, {"server_epochs": -1}, {"tau": -1.0}, {"proto_classes": "x"}):
        with pytest.raises(UserError):
            get_method("fedtgp")(**bad)


@needs_fmnist
def test_end_to_end_beats_chance_both_heads(tiny_cfg):
    cfg = tiny_cfg("fedtgp", rounds=3, eval_every=3)
    s = run(cfg, progress=False)
    assert s["bytes_up"] == cfg.rounds * cfg.clients * 2 * (4 * REP_DIM + 8)
    assert s["bytes_down"] == (cfg.rounds - 1) * cfg.clients * C * (4 * REP_DIM + 8)
    assert s["best_mean_acc"] > 65 and s["best_mean_acc_head"] > 65
