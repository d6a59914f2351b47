"""FedProto: per-class mean representations up, count-weighted global prototypes down."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import fit_flops, needs_fmnist, one_pass_fit, synthetic_client, synthetic_server
from mhpfl.datasets import dataset_info
from mhpfl.engine import Upload, message_bytes, run
from mhpfl.errors import UserError
from mhpfl.methods import get_method
from mhpfl.methods.fedproto import proto_loss
from mhpfl.models import REP_DIM

INFO = dataset_info("fmnist")
C = INFO.num_classes


def make_client(cid=1, arch="cnn4", labels=(2, 7, 7), n=12):
    return synthetic_client("fedproto", cid, arch, labels, n)


def make_server():
    return synthetic_server("fedproto")


def class_means(client):
    with torch.no_grad():
        _, rep = client.model(client.data.train.x, return_rep=True)
    y = client.data.train.y
    return rep, torch.stack([rep[y == 2].mean(0), rep[y == 7].mean(0)])


def test_upload_protos_labels_counts(monkeypatch):
    m = get_method("fedproto")()
    client = make_client()
    m.init_client(client)
    client.start_update(1, "round")
    monkeypatch.setattr(client, "fit", one_pass_fit(client, []))
    up = m.client_update(client, {}, "round")
    assert list(up) == ["protos", "labels", "counts"]
    assert up["protos"].shape == (2, REP_DIM) and up["protos"].dtype == torch.float32
    assert up["labels"].tolist() == [2, 7] and up["labels"].dtype == torch.int64
    assert up["counts"].tolist() == [4, 8] and up["counts"].dtype == torch.int64
    assert message_bytes(up) == 2 * (4 * REP_DIM + 8 + 8) == 4032
    torch.testing.assert_close(up["protos"], class_means(client)[1])

    u = get_method("fedproto")(weighting="uniform")
    u.init_client(client)
    up = u.client_update(client, {}, "round")
    assert list(up) == ["protos", "labels"] and message_bytes(up) == 2 * (4 * REP_DIM + 8)


def test_protos_after_training_use_a_metered_pass():
    m = get_method("fedproto")(proto_from="after")
    client = make_client()
    m.init_client(client)
    client.start_update(1, "round")
    before = client.meter.total
    up = m.client_update(client, {}, "round")
    per_sample = client.meter.per_sample[client.arch]
    n = len(client.data.train)
    # 1 epoch (one step per batch) + 1 inference pass
    assert client.meter.total - before == fit_flops(client.model, n, client.cfg.batch_size) + per_sample * n
    torch.testing.assert_close(up["protos"], class_means(client)[1])  # the trained model's


def test_mse_term_zero_when_representations_equal_prototypes():
    rep = torch.randn(4, REP_DIM)
    y = torch.tensor([1, 1, 4, 6])
    rep[1] = rep[0]
    protos = torch.zeros(C, REP_DIM)
    has = torch.zeros(C, dtype=torch.bool)
    protos[1], protos[4] = rep[0], rep[2]
    has[[1, 4]] = True
    assert float(proto_loss(rep, y, protos, has)) == 0.0  # label 6 has no prototype: 0
    moved = rep.clone()
    moved[2] += 1.0
    assert float(proto_loss(moved, y, protos, has)) == pytest.approx(REP_DIM / (4 * REP_DIM))


def test_local_loss_is_ce_plus_lambda_mse(monkeypatch):
    m = get_method("fedproto")(ld=0.3)
    client = make_client()
    m.init_client(client)
    client.start_update(2, "round")
    losses = []
    monkeypatch.setattr(client, "fit", one_pass_fit(client, losses))
    glob = torch.randn(1, REP_DIM)
    m.client_update(client, {"protos": glob, "labels": torch.tensor([7])}, "round")
    with torch.no_grad():
        logits, rep = client.model(client.data.train.x, return_rep=True)
    y = client.data.train.y
    target = torch.where((y == 7)[:, None], glob.expand_as(rep), rep)
    torch.testing.assert_close(losses[0], F.cross_entropy(logits, y) + 0.3 * F.mse_loss(rep, target))


def test_server_averages_per_class_weighted_by_counts():
    m = get_method("fedproto")()
    server = make_server()
    m.init_server(server)
    assert m.server_message(server, 0, "round") == {}  # round 1: no prototypes yet
    a, b, c = torch.randn(3, REP_DIM)
    ups = [Upload(0, 1, {"protos": torch.stack([a, b]), "labels": torch.tensor([1, 3]), "counts": torch.tensor([10, 30])}),
           Upload(1, 1, {"protos": c[None], "labels": torch.tensor([3]), "counts": torch.tensor([10])})]
    m.aggregate(server, ups, "round")
    down = m.server_message(server, 5, "round")
    assert down["labels"].tolist() == [1, 3] and down["protos"].shape == (2, REP_DIM)
    assert message_bytes(down) == 2 * (4 * REP_DIM + 8)
    torch.testing.assert_close(down["protos"][0], a)
    torch.testing.assert_close(down["protos"][1], (30 * b + 10 * c) / 40)
    # next round: class 1 absent keeps its prototype, class 3 replaced
    m.aggregate(server, [Upload(1, 1, {"protos": a[None], "labels": torch.tensor([3]), "counts": torch.tensor([1])})], "round")
    down = m.server_message(server, 5, "round")
    torch.testing.assert_close(down["protos"], torch.stack([a, a]))

    u = get_method("fedproto")(weighting="uniform")
    server = make_server()
    u.init_server(server)
    u.aggregate(server, [Upload(0, 1, {"protos": b[None], "labels": torch.tensor([3])}),
                         Upload(1, 1, {"protos": c[None], "labels": torch.tensor([3])})], "round")
    torch.testing.assert_close(u.server_message(server, 0, "round")["protos"][0], (b + c) / 2)


def test_proto_head_nearest_prototype_own_or_all_classes():
    client = make_client()
    x = client.data.train.x[:3]
    with torch.no_grad():
        _, rep = client.model(x, return_rep=True)
    assert float((rep[0] - rep[1]).pow(2).sum()) > 1e-2  # distinct samples, distinct representations
    for classes, expect in (("own", [2, 7, 7]), ("all", [5, 7, 7])):
        m = get_method("fedproto")(proto_classes=classes)
        m.init_client(client)
        assert m.predict(client, x, "proto").argmax(1).tolist() == [0, 0, 0]  # nothing received
        client.state["protos"][:] = rep[1] + 100  # far from everything
        client.state["protos"][5] = rep[0]  # exact match, but not the client's class
        client.state["protos"][2] = rep[0] + 1e-3
        client.state["protos"][7] = rep[1]
        client.state["has"][:] = True
        pred = m.predict(client, x, "proto").argmax(1).tolist()
        assert pred[:2] == expect[:2]
        assert set(pred) <= ({2, 7} if classes == "own" else set(range(C)))
        assert torch.equal(m.predict(client, x, "head"), client.model(x))


@pytest.mark.parametrize("method", ["fedproto", "fedtgp"])
def test_evaluation_runs_one_forward_pass_per_batch_for_both_heads(method):
    """The engine evaluates both heads from one pass of the model over each batch, with the
    counts each head's own `predict` gives."""
    from mhpfl.engine.runner import evaluate_client

    client = make_client()
    m = get_method(method)()
    m.init_client(client)
    client.ready = True
    client.state["protos"][:] = torch.randn_like(client.state["protos"])
    client.state["has"][::2] = True
    calls = []
    hook = client.model.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    counts = evaluate_client(m, client)
    hook.remove()
    splits = {"val": client.data.val, "test": client.data.test}
    assert calls == [len(y) for s in splits.values() for _, y in s.batches(256, shuffle=False)]
    for name, split in splits.items():
        for h in m.eval_heads:
            assert counts[f"{h}/{name}"] == client.correct(lambda x, h=h: m.predict(client, x, h), split)


def test_predict_heads_without_a_head_is_a_one_line_error():
    """A method (a plugin, say) whose predict_heads leaves out one of its eval_heads stops with
    a UserError naming the head, not with a KeyError traceback from the engine."""
    from mhpfl.engine.runner import evaluate_client

    client = make_client()
    m = get_method("fedproto")()
    m.init_client(client)
    client.ready = True
    m.predict_heads = lambda client, x: {"head": client.model(x)}  # "proto" left out
    with pytest.raises(UserError, match=r"no scores for eval head\(s\) proto;"):
        evaluate_client(m, client)


def test_bad_options():
    for bad in ({"weighting": "max"}, {"proto_classes": "some"}, {"proto_from": "val"}, {"ld": -1.0}):
        with pytest.raises(UserError):
            get_method("fedproto")(**bad)


@needs_fmnist
def test_end_to_end_beats_chance_both_heads(tiny_cfg):
    cfg = tiny_cfg("fedproto", eval_every=2)  # evaluate at rounds 0 and 2 only
    s = run(cfg, progress=False)
    per_up = 2 * (4 * REP_DIM + 16)  # K=2 classes per client
    assert s["bytes_up"] == cfg.rounds * cfg.clients * per_up
    assert s["bytes_down"] == (cfg.rounds - 1) * cfg.clients * C * (4 * REP_DIM + 8)
    assert s["best_mean_acc"] > 65
    assert s["best_mean_acc_proto"] > 65
