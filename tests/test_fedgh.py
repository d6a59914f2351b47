"""FedGH: class-mean representations up, a server-trained global header down."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import fit_flops, needs_fmnist, synthetic_client, synthetic_server
from mhpfl.config import RunConfig
from mhpfl.datasets import dataset_info
from mhpfl.engine import Upload, message_bytes, run
from mhpfl.errors import UserError
from mhpfl.methods import get_method
from mhpfl.models import REP_DIM

C = dataset_info("fmnist").num_classes


def test_upload_is_class_means_of_the_trained_model_with_a_metered_pass():
    m = get_method("fedgh")()
    client = synthetic_client("fedgh", 1, "cnn4", (2, 7, 7), 12)
    m.init_client(client)
    client.start_update(1, "round")
    before = client.meter.total
    up = m.client_update(client, {}, "round")
    assert list(up) == ["protos", "labels"]
    assert up["protos"].shape == (2, REP_DIM) and up["protos"].dtype == torch.float32
    assert up["labels"].tolist() == [2, 7] and up["labels"].dtype == torch.int64
    assert message_bytes(up) == 2 * (4 * REP_DIM + 8) == 4016
    n, per_sample = len(client.data.train), client.meter.per_sample["cnn4"]
    # 1 epoch (one step per batch) + 1 inference pass
    assert client.meter.total - before == fit_flops(client.model, n, client.cfg.batch_size) + per_sample * n
    with torch.no_grad():
        _, rep = client.model(client.data.train.x, return_rep=True)
    y = client.data.train.y
    torch.testing.assert_close(up["protos"], torch.stack([rep[y == 2].mean(0), rep[y == 7].mean(0)]))


def test_client_replaces_its_head_with_the_header_and_trains_the_whole_model(monkeypatch):
    m = get_method("fedgh")()
    client = synthetic_client("fedgh", 1, "cnn3", (2, 7), 12)
    header = {"weight": torch.randn(C, REP_DIM), "bias": torch.randn(C)}
    seen = {}

    def fit(params, loss_fn, **kw):
        seen["params"] = {id(p) for p in params}
        seen["head"] = {k: v.clone() for k, v in client.model.fc3.state_dict().items()}
        x, y = client.data.train.x, client.data.train.y
        torch.testing.assert_close(loss_fn(x, y), F.cross_entropy(client.model(x), y))
        return 0.0

    monkeypatch.setattr(client, "fit", fit)
    m.client_update(client, header, "round")
    assert seen["params"] == {id(p) for p in client.model.parameters()}
    assert all(torch.equal(seen["head"][k], header[k]) for k in header)


def uploads():
    g = torch.Generator().manual_seed(0)
    return [Upload(0, 10, {"protos": torch.randn(2, REP_DIM, generator=g).abs(), "labels": torch.tensor([1, 3])}),
            Upload(1, 10, {"protos": torch.randn(2, REP_DIM, generator=g).abs(), "labels": torch.tensor([3, 8])})]


def test_server_trains_the_header_on_the_uploads_and_sends_it():
    m = get_method("fedgh")(server_epochs=5)
    server = synthetic_server("fedgh")
    m.init_server(server)
    assert m.server_message(server, 0, "round") == {}  # round 1: clients keep their own heads
    ups = uploads()
    p = torch.cat([u.message["protos"] for u in ups])
    y = torch.cat([u.message["labels"] for u in ups])
    header = server.state["header"]
    w0 = header.weight.detach().clone()
    with torch.no_grad():
        ce0 = F.cross_entropy(header(p), y)
    m.aggregate(server, ups, "round")
    with torch.no_grad():
        ce1 = F.cross_entropy(header(p), y)
    assert not torch.equal(header.weight, w0)  # the released script's header never changes
    assert ce1 < ce0 - 0.1
    down = m.server_message(server, 4, "round")
    assert {k: tuple(v.shape) for k, v in down.items()} == {"weight": (C, REP_DIM), "bias": (C,)}
    assert message_bytes(down) == (REP_DIM + 1) * C * 4 == 20040
    assert torch.equal(down["weight"], header.weight)


def test_server_rule_is_sgd_over_the_pairs_in_order():
    m = get_method("fedgh")(server_lr=0.1)
    server = synthetic_server("fedgh")
    m.init_server(server)
    ref = nn.Linear(REP_DIM, C)
    ref.load_state_dict(server.state["header"].state_dict())
    ups = uploads()
    m.aggregate(server, ups, "round")
    cfg = server.cfg
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for u in ups:
        for p, y in zip(u.message["protos"], u.message["labels"]):
            opt.zero_grad()
            F.cross_entropy(ref(p[None]), y[None]).backward()
            opt.step()
    torch.testing.assert_close(server.state["header"].weight, ref.weight)


def test_bad_options_and_zoo_with_different_representations(monkeypatch):
    for bad in ({"server_epochs": 0}, {"server_batch": 0}, {"server_lr": -1.0}):
        with pytest.raises(UserError):
            get_method("fedgh")(**bad)
    import mhpfl.methods.zoo as zoo
    from mhpfl.models import CNN

    real = zoo.build_model

    def odd(arch, in_shape, c):  # cnn2 with a 300-d representation
        model = real(arch, in_shape, c)
        if arch == "cnn2":
            model.fc2, model.fc3 = nn.Linear(2000, 300), nn.Linear(300, c)
        return model

    monkeypatch.setattr(zoo, "build_model", odd)
    for method in ("fedgh", "fedtgp"):
        with pytest.raises(UserError, match="representation size") as e:
            RunConfig(method=method, download=False, data_root="/nonexistent").validate()
        assert "\n" not in str(e.value) and "cnn2: 300" in str(e.value)
        RunConfig(method=method, zoo="homo", download=False).validate()  # one model: fine
    assert CNN  # the zoo itself is untouched


@needs_fmnist
def test_end_to_end_beats_chance_and_bytes_are_exact(tiny_cfg):
    cfg = tiny_cfg("fedgh", rounds=3, eval_every=3)
    s = run(cfg, progress=False)
    assert s["bytes_up"] == cfg.rounds * cfg.clients * 2 * (4 * REP_DIM + 8)
    assert s["bytes_down"] == (cfg.rounds - 1) * cfg.clients * (REP_DIM + 1) * C * 4
    assert s["best_mean_acc"] > 65
