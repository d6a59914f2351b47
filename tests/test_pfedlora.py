import pytest
import torch

from mhpfl.config import RunConfig
from mhpfl.errors import UserError

from mhpfl.engine import Upload, run
from mhpfl.engine.aggregate import weighted_average
from mhpfl.methods import get_method
from mhpfl.methods.pfedlora import common_layers
from tests.conftest import needs_fmnist


def test_default_targets_are_the_layers_homogeneous_across_the_zoo():
    assert common_layers(["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"], (3, 32, 32), 10) == ["conv1", "fc3"]
    assert common_layers(["cnn1"] * 4, (1, 28, 28), 10) == ["fc1", "fc2", "fc3"]


def test_server_average_is_the_sample_weighted_mean():
    a = {"fc3.lora_A.weight": torch.tensor([[1.0, 2.0]]), "fc3.lora_B.weight": torch.tensor([[0.0]])}
    b = {"fc3.lora_A.weight": torch.tensor([[3.0, 6.0]]), "fc3.lora_B.weight": torch.tensor([[4.0]])}
    avg = weighted_average([Upload(0, 30, a), Upload(1, 10, b)])
    assert torch.allclose(avg["fc3.lora_A.weight"], torch.tensor([[1.5, 3.0]]))
    assert torch.allclose(avg["fc3.lora_B.weight"], torch.tensor([[1.0]]))


def make_one_client(tiny_cfg, cid=1, **opts):
    """A real pFedLoRA client (5 hetero clients, Fashion-MNIST) and a fresh global adapter."""
    from mhpfl.datasets import PartitionSpec, federate
    from mhpfl.engine import Client, FlopMeter, Server
    from mhpfl.models import zoo_archs

    wd = opts.pop("weight_decay", 1e-3)
    cfg = tiny_cfg("pfedlora", clients=5, weight_decay=wd, method_options=opts)
    cfg.validate()
    data = federate(cfg.dataset, cfg.clients, PartitionSpec.parse(cfg.partition), cfg.seed,
                    data_root=cfg.data_root, download=False, train_fraction=cfg.train_fraction)
    method = get_method("pfedlora")(**opts)
    client = Client(cid, zoo_archs("hetero", 5)[cid], data.clients[cid], data.public, data.info, cfg,
                    FlopMeter(), "pfedlora")
    method.init_client(client)
    server = Server(cfg, data.info, len(data.public))
    method.init_server(server)
    return method, client, server


@pytest.fixture
def one_client(tiny_cfg):
    return make_one_client(tiny_cfg, adapter="auto")


@needs_fmnist
def test_only_adapter_tensors_leave_the_client(one_client):
    method, client, server = one_client
    msg = method.server_message(server, 1, "round")
    client.start_update(1, "round")
    up = method.client_update(client, msg, "round")
    r = method.rank
    assert method.adapter == "auto"
    assert {k: tuple(v.shape) for k, v in up.items()} == {
        "conv1.lora_A.weight": (r, 1, 5, 5), "conv1.lora_B.weight": (16, r, 1, 1),
        "fc3.lora_A.weight": (r, 500), "fc3.lora_B.weight": (10, r)}
    assert set(up) == set(msg)  # same shape on every client: what the server averages
    assert all(not torch.equal(up[k], msg[k]) for k in up)  # the adapter phase trained it


@needs_fmnist
def test_client_loads_the_global_adapter_before_training(one_client, monkeypatch):
    from peft import get_peft_model_state_dict

    method, client, server = one_client
    msg = {k: torch.full_like(v, 0.01) for k, v in method.server_message(server, 1, "round").items()}
    seen = []
    monkeypatch.setattr(type(client), "fit", lambda self, params, loss_fn, **kw:
                        seen.append({k: v.clone() for k, v in get_peft_model_state_dict(client.model).items()}))
    method.client_update(client, msg, "round")
    assert all(torch.equal(seen[0][k], msg[k]) for k in msg)


@needs_fmnist
def test_each_phase_trains_only_its_part(one_client, monkeypatch):
    method, client, server = one_client
    model = client.model
    snapshots = []
    real_fit = type(client).fit

    def spy(self, params, loss_fn, **kw):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = real_fit(self, params, loss_fn, **kw)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        snapshots.append(changed)
        return out

    monkeypatch.setattr(type(client), "fit", spy)
    client.start_update(1, "round")
    method.client_update(client, method.server_message(server, 1, "round"), "round")
    local_phase, adapter_phase = snapshots
    assert local_phase and all("lora_" not in n for n in local_phase)  # adapter frozen
    assert adapter_phase and all("lora_" in n for n in adapter_phase)  # local model frozen


@needs_fmnist
def test_end_to_end_beats_chance_and_bytes_are_exact(tiny_cfg):
    cfg = tiny_cfg("pfedlora", clients=5, rounds=3, frac=0.6, method_options={"adapter": "auto"})
    s = run(cfg, progress=False)
    assert s["best_mean_acc"] > 75  # two classes per client: chance is ~50%
    adapter_bytes = 4 * sum(8 * n for n in (25 + 16, 500 + 10))
    participants = 3  # round(0.6 * 5)
    assert s["bytes_up"] == s["bytes_down"] == cfg.rounds * participants * adapter_bytes
    assert s["flops_per_sample"]["cnn1+lora"] > s["flops_per_sample"]["cnn1"]


READINGS = [{"adapter": "fc3"}, {"adapter": "conv1,fc3"}, {"adapter": "model", "rank": 4}]


@needs_fmnist
@pytest.mark.parametrize("opts", READINGS, ids=lambda o: o["adapter"])
def test_adapter_phase_gradients_reach_lora_a_and_b(tiny_cfg, monkeypatch, opts):
    """With weight decay 0, only a gradient can move the adapter: after the round both factors
    have changed, and the adapter phase saw non-zero gradients on both."""
    method, client, server = make_one_client(tiny_cfg, weight_decay=0.0, **opts)
    assert client.cfg.weight_decay == 0.0
    model, parallel = client.model, client.state.get("parallel")
    named = dict((parallel or model).named_parameters())
    lora = {n: p for n, p in named.items() if "lora_A" in n or "lora_B" in n}
    assert any("lora_A" in n for n in lora) and any("lora_B" in n for n in lora)
    grads = {n: 0.0 for n in lora}
    real_fit = type(client).fit
    phase = []

    def spy(self, params, loss_fn, **kw):
        phase.append(len(phase))
        if len(phase) == 2:  # the adapter phase
            hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, grads[n] + float(g.abs().sum())))
                     for n, p in lora.items()]
            try:
                return real_fit(self, params, loss_fn, **kw)
            finally:
                for h in hooks:
                    h.remove()
        return real_fit(self, params, loss_fn, **kw)

    monkeypatch.setattr(type(client), "fit", spy)
    msg = method.server_message(server, 1, "round")
    client.start_update(1, "round")
    up = method.client_update(client, msg, "round")
    assert all(g > 0 for g in grads.values()), grads
    changed = {k for k in up if not torch.equal(up[k], msg[k])}
    assert {k for k in up if "lora_" in k} <= changed


@needs_fmnist
@pytest.mark.parametrize("opts", READINGS, ids=lambda o: o["adapter"])
def test_prediction_uses_the_clients_own_adapter(tiny_cfg, opts):
    method, client, server = make_one_client(tiny_cfg, **opts)
    client.start_update(1, "round")
    method.client_update(client, method.server_message(server, 1, "round"), "round")
    model, parallel = client.model, client.state.get("parallel")
    x = client.data.test.x[:16]
    with torch.no_grad():
        pred = method.predict(client, x, "model")
        own = method.state(model, parallel)
        # another adapter (zeroed B): the prediction changes; restoring its own brings it back
        method.load(model, parallel, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in own.items()})
        bare = method.predict(client, x, "model")
        method.load(model, parallel, own)
        again = method.predict(client, x, "model")
    assert not torch.allclose(pred, bare)
    assert torch.equal(pred, again)
    if parallel is not None:
        torch.testing.assert_close(pred, model(x) + parallel(x))


@pytest.mark.parametrize("opts, needle", [
    ({"adapter": "conv2"}, "layer 'conv2' is not in every model"),
    ({"adapter": "fc3,nope"}, "layer 'nope'"),
    ({"adapter": "fc3", "rank": 11}, "--rank in [1, 10]"),
    ({"adapter": "conv1", "rank": 17}, "--rank in [1, 16]"),
    ({"adapter": "auto", "rank": 17}, "--rank in [1, 16] for conv1"),
    ({"adapter": "fc3", "rank": 0}, "--rank must be in [1, inf)"),  # the option's own interval, first
    ({"adapter": "model", "rank": 5000}, "--rank in [1, 2304]"),
    ({"adapter": ","}, "no layer to adapt"),
])
def test_bad_reading_or_rank_is_one_line_before_data(opts, needle):
    cfg = RunConfig(method="pfedlora", download=False, data_root="/nonexistent", method_options=opts)
    with pytest.raises(UserError) as e:
        cfg.validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_readings_validate():
    for opts in ({"adapter": "model", "rank": 16}, {"adapter": "conv1", "rank": 16}, {"adapter": "fc3", "rank": 10}):
        RunConfig(method="pfedlora", download=False, method_options=opts).validate()
    RunConfig(method="pfedlora", zoo="homo", download=False, method_options={"adapter": "fc1,fc2"}).validate()
