"""FD: per-label average logits up, per-client targets (others' logits only) down."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import needs_fmnist, one_pass_fit, synthetic_client, synthetic_server
from mhpfl.datasets import dataset_info
from mhpfl.engine import Upload, message_bytes, run
from mhpfl.errors import UserError
from mhpfl.methods import get_method
from mhpfl.methods.fd import distill_loss

INFO = dataset_info("fmnist")
C = INFO.num_classes


def make_client(cid=1, arch="cnn3", labels=(2, 7), n=12):
    return synthetic_client("fd", cid, arch, labels, n)


def make_server():
    return synthetic_server("fd")


def test_upload_is_per_label_mean_logits_of_training_passes(monkeypatch):
    m = get_method("fd")()
    client = make_client()
    client.start_update(1, "round")
    monkeypatch.setattr(client, "fit", one_pass_fit(client, []))
    up = m.client_update(client, {}, "round")
    assert list(up) == ["logits", "labels"]
    assert up["logits"].shape == (2, C) and up["logits"].dtype == torch.float32
    assert up["labels"].tolist() == [2, 7] and up["labels"].dtype == torch.int64
    assert message_bytes(up) == 2 * (4 * C + 8) == 96
    with torch.no_grad():
        logits = client.model(client.data.train.x)
    y = client.data.train.y
    torch.testing.assert_close(up["logits"], torch.stack([logits[y == 2].mean(0), logits[y == 7].mean(0)]))


def test_local_step_is_ce_plus_gamma_kl_to_received_targets(monkeypatch):
    m = get_method("fd")(gamma=0.5, temperature=2.0)
    client = make_client()
    client.start_update(1, "round")
    losses = []
    monkeypatch.setattr(client, "fit", one_pass_fit(client, losses))
    target = torch.randn(C)
    m.client_update(client, {}, "round")  # round 1: nothing received, CE only
    m.client_update(client, {"logits": target[None], "labels": torch.tensor([7])}, "round")
    x, y = client.data.train.x, client.data.train.y
    with torch.no_grad():
        logits = client.model(x)
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(losses[0], ce)
    mask = y == 7
    kl = F.kl_div(F.log_softmax(logits[mask] / 2, 1), F.softmax(target / 2, 0).expand(int(mask.sum()), C),
                  reduction="sum") * 4 / len(y)  # label-2 samples have no target: 0
    torch.testing.assert_close(losses[1], ce + 0.5 * kl)


def test_distill_loss_zero_at_target_and_masks_labels_without_target():
    table = torch.randn(C, C)
    has = torch.zeros(C, dtype=torch.bool)
    has[[1, 3]] = True
    y = torch.tensor([1, 3, 5])
    logits = torch.stack([table[1] + 4.0, table[3], torch.randn(C)])  # shift: same softmax
    assert float(distill_loss(logits, y, table, has, 1.0)) == pytest.approx(0.0, abs=1e-6)
    logits[0, 0] += 3
    assert float(distill_loss(logits, y, table, has, 1.0)) > 1e-3
    assert float(distill_loss(torch.randn(3, C), y, table, torch.zeros(C, dtype=torch.bool), 1.0)) == 0.0


@pytest.mark.parametrize("held", [[], [2, 5], list(range(C))], ids=["no-target", "some", "every-label"])
@pytest.mark.parametrize("t", [1.0, 3.0])
def test_distill_loss_without_host_reads_is_the_same_loss_and_gradient(monkeypatch, held, t):
    """The path taken where reading the mask would stall a GPU (rows weighted by the mask, no
    branch, no mask indexing) gives the branching path's value and gradient up to rounding."""
    from mhpfl import lean

    g = torch.Generator().manual_seed(len(held))
    table, y = torch.randn(C, C, generator=g), torch.randint(0, C, (16,), generator=g)
    has = torch.zeros(C, dtype=torch.bool)
    has[held] = True
    out = []
    for free in (True, False):
        monkeypatch.setattr(lean, "host_reads_are_free", lambda _, free=free: free)
        logits = torch.randn(16, C, generator=torch.Generator().manual_seed(7)).requires_grad_()
        loss = distill_loss(logits, y, table, has, t)
        loss.backward()
        out.append((loss.detach(), logits.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-7)
    assert (float(out[0][0]) > 1e-3) == bool(has[y].any())


def test_server_target_excludes_own_logits_and_averages_per_label():
    m = get_method("fd")()
    server = make_server()
    m.init_server(server)
    assert m.server_message(server, 0, "round") == {}  # round 1: nothing to send
    L = {k: torch.randn(2, C) for k in range(3)}
    uploads = [Upload(0, 50, {"logits": L[0], "labels": torch.tensor([0, 1])}),
               Upload(1, 10, {"logits": L[1], "labels": torch.tensor([1, 2])}),
               Upload(2, 99, {"logits": L[2], "labels": torch.tensor([2, 3])})]
    m.aggregate(server, uploads, "round")
    down = m.server_message(server, 1, "round")
    assert down["labels"].tolist() == [0, 1, 2, 3] and down["labels"].dtype == torch.int64
    assert down["logits"].shape == (4, C) and message_bytes(down) == 4 * (4 * C + 8)
    # client 1's target for its label 1 is client 0's only, for label 2 client 2's only
    torch.testing.assert_close(down["logits"], torch.stack([L[0][0], L[0][1], L[2][0], L[2][1]]))
    down0 = m.server_message(server, 0, "round")  # label 0 is held by nobody else
    assert down0["labels"].tolist() == [1, 2, 3]
    torch.testing.assert_close(down0["logits"][1], (L[1][1] + L[2][0]) / 2)  # unweighted per device

    incl = get_method("fd")(exclude_own=False)
    server = make_server()
    incl.init_server(server)
    incl.aggregate(server, uploads, "round")
    down = incl.server_message(server, 1, "round")
    torch.testing.assert_close(down["logits"][1], (L[0][1] + L[1][0]) / 2)


def test_server_keeps_latest_logits_of_absent_clients_unless_told_not_to():
    new = torch.randn(1, C)
    for keep, expect in ((True, [0, 5]), (False, [5])):
        m = get_method("fd")(keep_old=keep)
        server = make_server()
        m.init_server(server)
        m.aggregate(server, [Upload(0, 1, {"logits": torch.randn(1, C), "labels": torch.tensor([0])})], "round")
        m.aggregate(server, [Upload(2, 1, {"logits": new, "labels": torch.tensor([5])})], "round")
        assert m.server_message(server, 9, "round")["labels"].tolist() == expect


def test_bad_options():
    with pytest.raises(UserError):
        get_method("fd")(temperature=0.0)
    with pytest.raises(UserError):
        get_method("fd")(gamma=-1.0)


@needs_fmnist
def test_end_to_end_beats_chance(tiny_cfg):
    cfg = tiny_cfg("fd", clients=10, eval_every=2)  # 10 clients, K=2: every label has two holders
    s = run(cfg, progress=False)
    per_client = 2 * (4 * C + 8)
    assert s["bytes_up"] == cfg.rounds * cfg.clients * per_client
    # round 1 sends nothing; then every label has another holder: C labels per client
    assert s["bytes_down"] == (cfg.rounds - 1) * cfg.clients * C * (4 * C + 8)
    assert s["best_mean_acc"] > 65
