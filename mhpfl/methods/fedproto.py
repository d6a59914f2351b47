"""FedProto (Tan et al., AAAI 2022, arXiv 2105.00243): class prototypes exchanged, not models.

Client k keeps: its heterogeneous model F_k (representation f_k: the 500-d output of fc2, and
its head fc3) and the global prototypes it last received.
One round on a participant:
  1. receive the global prototypes P[j] of the classes the server has (round 1: none);
  2. train F_k for E local epochs with, per batch,
        CE(F_k(x), y) + lambda * MSE(f_k(x), P[y]),
     MSE = mean squared difference over the batch and the 500 dimensions (torch's MSELoss, as in
     the official code); a sample whose label has no global prototype yet contributes 0 to the
     MSE term (the official code compares its representation with itself); round 1 is CE only;
  3. compute its local prototypes C_k[j] = mean representation of its class-j samples, for the
     classes j it holds, and upload
        "protos" (n_held, 500) float32, "labels" (n_held,) int64 and, with --weighting count,
        "counts" (n_held,) int64 (the class sample counts the server weights by):
     n_held * (2000 + 8 + 8) bytes (4,032 for K = 2); without counts n_held * 2008.
Server: P[j] = sum_k |D_k,j| C_k[j] / sum_k |D_k,j| over this round's participants holding j
(--weighting count, the rule the issue and our paper notes give; the official code averages the
local prototypes unweighted: --weighting uniform). Classes nobody uploaded this round keep their
previous global prototype. It sends every participant all global prototypes, "protos"
(n_avail, 500) float32 and "labels" (n_avail,) int64: n_avail * 2008 bytes (20,080 for C = 10).
Prediction, two heads (both reported; the first is the main accuracy):
  - "head": argmax of F_k's own classifier (the official code's "w/o protos" accuracy);
  - "proto": the nearest global prototype to f_k(x) by squared L2 distance (= MSE), among the
    client's own classes (--proto-classes own, as the official code's "with protos" accuracy)
    or among all classes with a global prototype (--proto-classes all). The client compares
    with the prototypes it has *received*: those aggregated after round r reach it with round
    r+1's message, so this head lags the local head by one round (the official code evaluates
    with the server's latest prototypes, which a client would need one more download to hold).
    Before any prototype has arrived it predicts class 0 (scores all -inf).

Defaults and sources (docs/sources.md B6): lambda (--ld) = 1, the official code's default and its
MNIST/FEMNIST examples (its CIFAR-10 example uses 0.1). Local prototypes (--proto-from): the
official code averages the representations of the training forward passes of the round (all
local epochs, model in training mode), which costs no extra computation: default `training`;
`after` computes them after local training with one extra metered inference pass over the
client's training data, the same model whose head is then evaluated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mhpfl.methods.base import Method, Option
from mhpfl.methods.prototypes import class_means
from mhpfl.models import REP_DIM


def proto_loss(rep: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """torch's MSELoss (mean over batch x dims) between each representation and its label's
    global prototype; rows whose label has no prototype are compared with themselves (0)."""
    mask = has[y]
    target = torch.where(mask[:, None], protos[y], rep.detach())
    return F.mse_loss(rep, target)


def weighted_protos(uploads, num_classes: int, weighting: str):
    """Per-class weighted mean of the uploaded prototypes: (sums / weights, classes present)."""
    sums = torch.zeros(num_classes, REP_DIM, dtype=torch.float64)
    w = torch.zeros(num_classes, dtype=torch.float64)
    for u in uploads:
        labels = u.message["labels"].cpu()
        p = u.message["protos"].cpu().to(torch.float64)
        wk = (u.message["counts"].cpu().to(torch.float64) if weighting == "count"
              else torch.ones(len(labels), dtype=torch.float64))
        sums[labels] += wk[:, None] * p
        w[labels] += wk
    present = torch.nonzero(w > 0).flatten()
    return (sums[present] / w[present, None]).float(), present


class FedProto(Method):
    name = "fedproto"
    description = "per-class mean representations (prototypes) averaged; CE + lambda*MSE to global prototypes"
    eval_heads = ("head", "proto")
    options = {
        "ld": Option(1.0, "lambda, weight of the prototype MSE term (official code default 1)", interval="[0, inf)"),
        "weighting": Option("count", "server average of local prototypes: count (weighted by class "
                                     "sample counts) or uniform (official code)", choices=("count", "uniform")),
        "proto_classes": Option("own", "prototype head compares with the client's own classes "
                                       "(official code) or all classes", choices=("own", "all")),
        "proto_from": Option("training", "local prototypes from the round's training passes "
                                         "(official code) or an extra pass after training",
                             choices=("training", "after")),
    }

    # ---- client: keeps F_k and the global prototypes ------------------------------------
    def init_client(self, client):
        c, dev = client.num_classes, client.cfg.device
        client.state["protos"] = torch.zeros(c, REP_DIM, device=dev)
        client.state["has"] = torch.zeros(c, dtype=torch.bool, device=dev)

    def client_update(self, client, message, phase):
        model, c, dev = client.model, client.num_classes, client.cfg.device
        if "labels" in message:  # (1)
            labels = message["labels"].to(dev)
            client.state["protos"][labels] = message["protos"].to(dev)
            client.state["has"][labels] = True
        protos, has = client.state["protos"], client.state["has"]
        sums = torch.zeros(c, REP_DIM, device=dev)  # plain tensors in the closure: --batch-clients stacks them
        counts = torch.zeros(c, device=dev)

        def loss(x, y):  # (2)
            logits, rep = model(x, return_rep=True)
            if self.proto_from == "training":
                sums.index_add_(0, y, rep.detach().float())  # float(): bf16 under --precision bf16
                counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
            return F.cross_entropy(logits, y) + self.ld * proto_loss(rep, y, protos, has)

        client.fit(model.parameters(), loss)
        if self.proto_from == "after":  # (3)
            train = client.data.train
            means, held = class_means(client.infer(lambda x: model(x, return_rep=True)[1], train), train.y, c)
        else:
            held = torch.nonzero(counts > 0).flatten()
            means, held = (sums[held] / counts[held, None]).float(), held.to(torch.int64)
        up = {"protos": means, "labels": held}
        if self.weighting == "count":
            # samples per class of the local data (the training passes see each E times)
            n = torch.bincount(client.data.train.y, minlength=c)[held]
            up["counts"] = n.to(torch.int64)
        return up

    def predict(self, client, x, head):
        return self.predict_heads(client, x)[head]

    def predict_heads(self, client, x):  # both heads from one forward pass
        logits, rep = client.model(x, return_rep=True)
        allowed = client.state["has"].clone()
        if self.proto_classes == "own":
            own = torch.zeros_like(allowed)
            own[torch.as_tensor(client.data.classes, dtype=torch.long, device=own.device)] = True
            allowed &= own
        dist = torch.cdist(rep, client.state["protos"]).pow(2)
        return {"head": logits, "proto": torch.where(allowed[None, :], -dist, torch.full_like(dist, float("-inf")))}

    # ---- server: the global prototypes --------------------------------------------------
    def init_server(self, server):
        server.state["protos"] = torch.zeros(server.num_classes, REP_DIM)
        server.state["has"] = torch.zeros(server.num_classes, dtype=torch.bool)

    def server_message(self, server, cid, phase):
        avail = torch.nonzero(server.state["has"]).flatten()
        if len(avail) == 0:
            return {}
        return {"protos": server.state["protos"][avail], "labels": avail.to(torch.int64)}

    def aggregate(self, server, uploads, phase):
        protos, present = weighted_protos(uploads, server.num_classes, self.weighting)
        server.state["protos"][present] = protos
        server.state["has"][present] = True
