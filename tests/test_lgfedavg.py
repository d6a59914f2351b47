"""LG-FedAvg: only the global classifier travels; the server averages it weighted by samples."""
import pytest
import torch

from tests.conftest import needs_fmnist
from mhpfl.config import RunConfig
from mhpfl.datasets import ClientData, Split, dataset_info
from mhpfl.engine import Client, Server, Upload, message_bytes, run
from mhpfl.engine.meter import FlopMeter
from mhpfl.errors import UserError
from mhpfl.methods import get_method

INFO = dataset_info("fmnist")
C = INFO.num_classes
FC3_BYTES = (500 * C + C) * 4  # fc3.weight (C, 500) + fc3.bias (C,), float32


def make_client(cid=1, arch="cnn2", labels=(2, 7), n=16, **cfg):
    g = torch.Generator().manual_seed(cid)
    y = torch.tensor(labels).repeat(n // len(labels))
    split = Split(torch.randn(len(y), *INFO.in_shape, generator=g), y)
    conf = RunConfig(method="lgfedavg", download=False, **cfg)
    data = ClientData(split, split, split, sorted(labels))
    return Client(cid, arch, data, split, INFO, conf, FlopMeter(), "lgfedavg")


def make_server(**cfg):
    conf = RunConfig(method="lgfedavg", download=False, **cfg)
    s = Server(conf, INFO, 0)
    s.start_round(1)
    return s


def test_client_loads_global_head_trains_all_uploads_only_fc3(monkeypatch):
    m = get_method("lgfedavg")()
    client = make_client()
    m.init_client(client)
    client.start_update(1, "round")
    conv1_before = client.model.conv1.weight.detach().clone()
    down = {"fc3.weight": torch.randn(C, 500), "fc3.bias": torch.randn(C)}
    seen = {}

    def fake_fit(params, loss_fn, **kw):  # record what is trained, do not step
        seen["params"] = list(params)
        seen["loss"] = float(loss_fn(client.data.train.x, client.data.train.y).detach())
        return seen["loss"]

    monkeypatch.setattr(client, "fit", fake_fit)
    up = m.client_update(client, down, "round")
    assert {id(p) for p in seen["params"]} == {id(p) for p in client.model.parameters()}
    assert list(up) == ["fc3.weight", "fc3.bias"]
    assert up["fc3.weight"].shape == (C, 500) and up["fc3.bias"].shape == (C,)
    assert up["fc3.weight"].dtype == torch.float32
    assert message_bytes(up) == FC3_BYTES == 20040
    torch.testing.assert_close(up["fc3.weight"], down["fc3.weight"])  # the global head was loaded
    torch.testing.assert_close(client.model.conv1.weight, conv1_before)  # private layers untouched


def test_real_local_update_changes_the_head():
    m = get_method("lgfedavg")()
    client = make_client()
    m.init_client(client)
    client.start_update(1, "round")
    down = {"fc3.weight": torch.zeros(C, 500), "fc3.bias": torch.zeros(C)}
    up = m.client_update(client, down, "round")
    assert up["fc3.weight"].abs().sum() > 0  # trained, not the zeros it received


def test_server_sends_fc3_and_averages_weighted_by_samples():
    m = get_method("lgfedavg")()
    server = make_server()
    m.init_server(server)
    down = m.server_message(server, 0, "round")
    assert list(down) == ["fc3.weight", "fc3.bias"] and message_bytes(down) == FC3_BYTES
    a = {"fc3.weight": torch.full((C, 500), 1.0), "fc3.bias": torch.full((C,), 2.0)}
    b = {"fc3.weight": torch.full((C, 500), 5.0), "fc3.bias": torch.full((C,), -2.0)}
    m.aggregate(server, [Upload(0, 10, a), Upload(1, 30, b)], "round")
    down = m.server_message(server, 3, "round")
    torch.testing.assert_close(down["fc3.weight"], torch.full((C, 500), 4.0))  # (10*1+30*5)/40
    torch.testing.assert_close(down["fc3.bias"], torch.full((C,), -1.0))

    u = get_method("lgfedavg")(weighting="uniform")
    server = make_server()
    u.init_server(server)
    u.aggregate(server, [Upload(0, 10, a), Upload(1, 30, b)], "round")
    torch.testing.assert_close(u.server_message(server, 0, "round")["fc3.weight"], torch.full((C, 500), 3.0))


def test_global_layers_validated_against_the_zoo():
    with pytest.raises(UserError, match="differs in shape"):
        get_method("lgfedavg")(global_layers="fc3,fc1").init_server(make_server())
    with pytest.raises(UserError, match="no layer"):
        get_method("lgfedavg")(global_layers="head").init_server(make_server())
    with pytest.raises(UserError, match="weighting"):
        get_method("lgfedavg")(weighting="median")
    # conv1 is identical across the hetero zoo; fc1 is on the homogeneous zoo
    m = get_method("lgfedavg")(global_layers="conv1,fc3")
    server = make_server()
    m.init_server(server)
    assert set(m.server_message(server, 0, "round")) == {"conv1.weight", "conv1.bias", "fc3.weight", "fc3.bias"}
    m = get_method("lgfedavg")(global_layers="fc1")
    server = make_server(zoo="homo")
    m.init_server(server)
    assert set(m.server_message(server, 0, "round")) == {"fc1.weight", "fc1.bias"}


def test_warmup_rounds_share_every_identical_layer():
    m = get_method("lgfedavg")(warmup_rounds=1)
    server = make_server()
    m.init_server(server)
    assert set(m.server_message(server, 0, "round")) == {"conv1.weight", "conv1.bias", "fc3.weight", "fc3.bias"}
    server.start_round(2)
    assert set(m.server_message(server, 0, "round")) == {"fc3.weight", "fc3.bias"}


def test_client_set_up_checks_the_zoo_on_the_meta_device_once_per_zoo():
    """Every client checks --global-layers against the zoo at its set-up: from shapes of models
    built on the meta device, once per zoo, so a set-up initialises no model and draws no random
    number (real models cost 0.1 s per client, about a fifth of a round at full's N100 setting)."""
    from mhpfl.methods.lgfedavg import zoo_parameter_shapes

    zoo_parameter_shapes.cache_clear()
    m = get_method("lgfedavg")()
    clients = [make_client(cid, arch, clients=100) for cid, arch in ((1, "cnn1"), (2, "cnn2"), (3, "cnn5"))]
    rng = torch.get_rng_state()
    for c in clients:
        m.init_client(c)
        assert (c.state["global_layers"], c.state["common_layers"]) == (["fc3"], ["conv1", "fc3"])
    assert torch.equal(torch.get_rng_state(), rng)
    assert zoo_parameter_shapes.cache_info().misses == 1 and zoo_parameter_shapes.cache_info().hits == 2


@needs_fmnist
def test_end_to_end_beats_chance(tiny_cfg):
    cfg = tiny_cfg("lgfedavg", eval_every=2)  # evaluate at rounds 0 and 2 only
    s = run(cfg, progress=False)
    per_round = cfg.clients * FC3_BYTES
    assert s["bytes_up"] == s["bytes_down"] == cfg.rounds * per_round
    assert s["best_mean_acc"] > 65  # K=2 classes per client: chance is ~50%
