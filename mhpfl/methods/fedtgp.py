"""FedTGP (Zhang et al., AAAI 2024, arXiv 2401.03230): trainable global prototypes learned on the
server with adaptive-margin-enhanced contrastive learning (ACL).

Client k keeps: its heterogeneous model F_k (representation f_k: the 500-d fc2 output) and the
global prototypes it last received. Its round is FedProto's (mhpfl/methods/fedproto.py):
  1. receive the global prototypes P[j] of every class (round 1: none);
  2. train F_k for E local epochs with CE(F_k(x), y) + lambda * MSE(f_k(x), P[y]) (round 1: CE);
  3. after training, compute the local prototype of each class it holds (the class mean of f_k
     over its training data, one extra metered inference pass) and upload
        "protos" (n_held, 500) float32, "labels" (n_held,) int64: n_held * 2008 bytes.
Server: keeps the prototype generator G (persistent across rounds): a learnable embedding per
class -> Linear(d, d) -> ReLU -> Linear(d, d), d = 500. Each round:
  - margin: average this round's uploaded prototypes per class (uniformly over clients); for each
    class, the distance to the nearest other class's average; classes without an average take the
    smallest such distance; margin = min(largest of these distances, tau);
  - S server epochs over the uploaded (prototype p, label y) pairs, shuffled (by the run's
    seeded server stream for the round), in batches of the run's batch size, plain SGD at the
    run's lr, minimising
        CE(-(dist(p, G(c)) for c in classes) - margin * onehot(y), y)
    with dist the Euclidean distance: each prototype pulled to its class's global prototype and
    pushed at least `margin` further from the others (ACL);
  - the global prototypes P[c] = G(c) for every class are sent to every participant:
    "protos" (C, 500) float32, "labels" (C,) int64: C * 2008 bytes (20,080 for C = 10).
Prediction, two heads (the first is the reported accuracy):
  - "proto": the nearest received global prototype to f_k(x) (all classes, as HtFLlib's test);
    before any prototype has arrived it predicts class 0;
  - "head": F_k's own classifier.

Defaults and sources (docs/sources.md B9): lambda (--ld) = 10, S (--server-epochs) = 100 and
tau (--tau) = 100: the paper's settings and HtFLlib's defaults (main.py: lamda 10, server_epochs
100, margin_threthold 100). Server learning rate = the clients' and server batch size = the
clients': HtFLlib (servertgp.py). Prototypes after training, uploaded unweighted: HtFLlib
(clienttgp.py collect_protos). --proto-classes own restricts the prototype head to the client's
classes (our option, as FedProto's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhpfl.lean import SGD
from mhpfl.methods.base import Option
from mhpfl.methods.fedproto import FedProto
from mhpfl.methods.prototypes import class_means
from mhpfl.methods.zoo import require_common_rep
from mhpfl.seeding import seed_torch, torch_gen


class PrototypeGenerator(nn.Module):
    """Class id -> global prototype: embedding -> Linear -> ReLU -> Linear."""

    def __init__(self, num_classes: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.embedding = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, dim)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(self.embedding(classes)))


def adaptive_margin(protos: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float) -> float:
    """min(max over classes of the distance from the class's average prototype to the nearest
    other class's average, tau); classes without an average take the smallest distance."""
    means, held = class_means(protos, labels, num_classes)
    if len(held) < 2:  # no pair of classes: HtFLlib's gaps stay at 1e9, so the margin is tau
        return float(tau)
    d = torch.cdist(means.double(), means.double())
    d.fill_diagonal_(float("inf"))
    gap = d.min(1).values  # classes without an average would take gap.min(): never the max
    return float(min(float(gap.max()), tau))


def acl_loss(gen: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Adaptive-margin contrastive loss: CE over negative Euclidean distances, the true class's
    distance increased by the margin."""
    sq = (protos.pow(2).sum(1, keepdim=True) - 2 * protos @ gen.T + gen.pow(2).sum(1)[None, :])
    dist = sq.clamp_min(1e-12).sqrt()
    return F.cross_entropy(-(dist + margin * F.one_hot(labels, gen.shape[0])), labels)


class FedTGP(FedProto):
    name = "fedtgp"
    description = "trainable global prototypes learned on the server by adaptive-margin contrastive learning"
    eval_heads = ("proto", "head")
    weighting, proto_from = "uniform", "after"  # HtFLlib: unweighted uploads, prototypes after training
    options = {
        "ld": Option(10.0, "lambda, weight of the prototype MSE term (paper and HtFLlib: 10)", interval="[0, inf)"),
        "server_epochs": Option(100, "server epochs S of contrastive training per round (paper, HtFLlib: 100)",
                                interval="[0, inf)"),
        "tau": Option(100.0, "margin threshold tau (paper, HtFLlib: 100)", interval="[0, inf)"),
        "proto_classes": Option("all", "prototype head compares with all classes (HtFLlib) or the "
                                       "client's own", choices=("own", "all")),
    }

    def validate(self, cfg, info):
        require_common_rep(self.name, cfg, info)

    # client: FedProto's (CE + lambda * MSE; prototypes after training); prediction as above

    # ---- server: the prototype generator ----------------------------------------------
    def init_server(self, server):
        seed_torch(server.cfg.seed, "init", "server", "fedtgp-generator")
        rep = require_common_rep(self.name, server.cfg, server.info)
        server.state["gen"] = server.track(PrototypeGenerator(server.num_classes, rep))
        super().init_server(server)

    def aggregate(self, server, uploads, phase):
        if not uploads:
            return
        gen, cfg, c = server.state["gen"], server.cfg, server.num_classes
        dev = next(gen.parameters()).device
        protos = torch.cat([u.message["protos"].to(dev) for u in uploads])
        labels = torch.cat([u.message["labels"].to(dev) for u in uploads])
        margin = adaptive_margin(protos, labels, c, self.tau)
        classes = torch.arange(c, device=dev)
        opt = SGD(gen.parameters(), lr=cfg.lr)
        g = torch_gen(cfg.seed, "server", server.round, "fedtgp-batches")
        gen.train()
        with torch.enable_grad():
            for _ in range(self.server_epochs):
                order = torch.randperm(len(labels), generator=g).to(dev)
                for i in range(0, len(labels), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    loss = acl_loss(gen(classes), protos[idx], labels[idx], margin)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        server.state["margin"] = margin
        with torch.no_grad():
            server.state["protos"] = gen(classes).detach().cpu()
        server.state["has"][:] = True
