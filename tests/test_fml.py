"""FML: wire messages, server rule, the two mutual-learning losses, and a short real run."""
import math

import torch
import torch.nn.functional as F

from tests.conftest import needs_fmnist
from mhpfl.config import RunConfig
from mhpfl.datasets import ClientData, Split, dataset_info
from mhpfl.engine import Client, FlopMeter, Server, Upload, message_bytes, run
from mhpfl.engine.runner import wire
from mhpfl.methods import get_method
from mhpfl.methods.fml import mutual_losses
from mhpfl.models import build_model, num_params

INFO = dataset_info("fmnist")


def fake_client(cid, arch, cfg, meter, n=48):
    g = torch.Generator().manual_seed(100 + cid)

    def split(k):
        return Split(torch.randn(k, *INFO.in_shape, generator=g), torch.randint(0, 10, (k,), generator=g))

    return Client(cid, arch, ClientData(split(n), split(4), split(8), list(range(10))), split(0), INFO,
                  cfg, meter, "fml")


def test_messages_are_the_meme_weights_both_ways():
    cfg = RunConfig(method="fml", clients=2, rounds=1, batch_size=16)
    method, meter = get_method("fml")(), FlopMeter()
    clients = [fake_client(0, "cnn1", cfg, meter), fake_client(1, "cnn3", cfg, meter)]
    for c in clients:
        method.init_client(c)
    server = Server(cfg, INFO, 0)
    method.init_server(server)
    server.start_round(1)
    meme = build_model("cnn5", INFO.in_shape, 10)
    names = {n: tuple(t.shape) for n, t in meme.state_dict().items()}
    dense = num_params(meme) * 4
    assert dense == 525_258 * 4
    for c in clients:
        down = wire(method.server_message(server, c.cid, "round"), "fml", "server")
        assert {n: tuple(t.shape) for n, t in down.items()} == names
        assert message_bytes(down) == dense
        before = [p.detach().clone() for p in c.model.parameters()]
        c.start_update(1, "round")
        up = wire(method.client_update(c, down, "round"), "fml", "client")
        assert {n: tuple(t.shape) for n, t in up.items()} == names and message_bytes(up) == dense
        assert all(t.dtype == torch.float32 for t in up.values())
        # the meme started from the server's and was trained; the private model was trained too
        assert any(not torch.equal(up[n], down[n]) for n in names)
        assert any(not torch.equal(a, b) for a, b in zip(before, c.model.parameters()))
    # prediction is the private model's
    x = torch.randn(3, *INFO.in_shape)
    c = clients[0]
    c.model.eval()
    assert torch.equal(method.predict(c, x, "model"), c.model(x))


def test_server_averages_memes_weighted_by_samples():
    cfg = RunConfig(method="fml", clients=2, rounds=1)
    method = get_method("fml")()
    server = Server(cfg, INFO, 0)
    method.init_server(server)
    ups = [Upload(0, 1, {"w": torch.tensor([1.0, 0.0])}), Upload(1, 3, {"w": torch.tensor([5.0, 4.0])})]
    method.aggregate(server, ups, "round")
    assert torch.allclose(method.server_message(server, 0, "round")["w"], torch.tensor([4.0, 3.0]))


def _kl(p_logits, q_logits):  # KL(softmax p || softmax q), mean over rows, by hand
    p, q = p_logits.detach().softmax(1), q_logits.detach().softmax(1)
    return float((p * (p.log() - q.log())).sum(1).mean())


def _ce(logits, y):
    return float(-logits.detach().log_softmax(1)[torch.arange(len(y)), y].mean())


def test_mutual_losses_alpha_beta_and_detach():
    local = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    meme = torch.tensor([[0.0, 1.0, 0.0], [1.5, -0.5, 0.2]], requires_grad=True)
    y = torch.tensor([0, 2])
    alpha, beta = 0.3, 0.8
    l_local, l_meme = mutual_losses(local, meme, y, alpha, beta)
    assert math.isclose(float(l_local.detach()), alpha * _ce(local, y) + (1 - alpha) * _kl(meme, local), rel_tol=1e-5)
    assert math.isclose(float(l_meme.detach()), beta * _ce(meme, y) + (1 - beta) * _kl(local, meme), rel_tol=1e-5)
    # each loss trains only its own model: the other's output is detached
    g_meme, = torch.autograd.grad(l_local, meme, allow_unused=True)
    g_local, = torch.autograd.grad(l_meme, local, allow_unused=True)
    assert g_meme is None and g_local is None
    # alpha = beta = 1 is plain cross-entropy
    a, b = mutual_losses(local, meme, y, 1.0, 1.0)
    assert torch.allclose(a, F.cross_entropy(local, y)) and torch.allclose(b, F.cross_entropy(meme, y))


@needs_fmnist
def test_short_real_run_beats_chance(tiny_cfg):
    cfg = tiny_cfg("fml")
    s = run(cfg, out=None, progress=False)
    assert s["client_archs"] == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    assert s["best_mean_acc"] > 65.0  # K=2 classes per client: chance is ~50%
    per_round = cfg.clients * 525_258 * 4
    assert s["bytes_up"] == cfg.rounds * per_round and s["bytes_down"] == cfg.rounds * per_round
