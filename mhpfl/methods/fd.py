"""FD, Federated Distillation (Jeong et al. 2018, arXiv 1811.11479): per-label logits exchanged.

Client k keeps: its heterogeneous model F_k.
One round on a participant:
  1. receive the global per-label logits T_k[l] for the labels l that the server has (round 1:
     none, the message is empty);
  2. train F_k for E local epochs on its data with, per sample (x, y),
        CE(F_k(x), y) + gamma * T^2 * KL(softmax(T_k[y] / T) || softmax(F_k(x) / T)),
     the distillation term present only for samples whose label has a target (see below);
     meanwhile accumulate the logits F_k(x) of every training forward pass of this round, per
     label (FD's per-label local average logits, computed for free during training as in the
     paper's algorithm);
  3. upload the per-label average logits for the labels it holds:
        "logits" (n_held, C) float32 and "labels" (n_held,) int64,
     i.e. n_held * (4C + 8) bytes (96 bytes for K = 2 labels and C = 10).
Server: keeps each client's latest per-label average logits (--keep-old, default true, so that
under partial participation a target averages every client that has reported so far, like FD's
average over all devices; false: only the uploads of the previous round). Before a round it
sends participant k, for every label l held by at least one *other* client j != k,
        T_k[l] = mean over those j of their average logits for l     (unweighted, per device),
as "logits" (n_avail, C) float32 and "labels" (n_avail,) int64: n_avail * (4C + 8) bytes
(480 bytes for C = 10 when every label has a holder). The message is per client because k's
own contribution is excluded (--exclude-own, default true), which the FD paper's per-device
index on the global average (F-hat^(i)) expresses; the accessible text did not let us confirm
it (docs/sources.md B5), so --exclude-own false sends the plain average to all.
A label that nobody else holds has no target: its samples get cross-entropy only; so do all
samples in round 1, when the server has nothing yet.
Prediction: F_k.

Defaults that the paper's accessible text does not give (docs/sources.md B5: temperature and
distillation weight NOT FOUND), chosen and exposed: --temperature 1 (FD describes its
regularizer as a cross-entropy between the model's output and the global average logits, with
no temperature), --gamma 1 (the regularizer added to the loss with equal weight). We write it as
a KL divergence, which has the same gradient as that cross-entropy and is 0 when the model's
output matches the target; the T^2 factor (Hinton et al. 2015) keeps gradients comparable across
temperatures and is 1 at the default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mhpfl import lean
from mhpfl.methods.base import Method, Option


def distill_loss(logits: torch.Tensor, y: torch.Tensor, table: torch.Tensor, has: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Mean over the batch of T^2 * KL(softmax(table[y]/T) || softmax(logits/T)); samples whose
    label has no target (has[y] false) contribute 0."""
    mask, t = has[y], temperature
    if not lean.host_reads_are_free(logits):  # GPU: no host read in a step, rows weighted by the mask
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(table[y] / t, dim=1), reduction="none")
        return (kl.sum(1) * mask).sum() * t * t / len(y)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    target = F.softmax(table[y[mask]] / t, dim=1)
    kl = F.kl_div(F.log_softmax(logits[mask] / t, dim=1), target, reduction="sum")
    return kl * t * t / len(y)


class FD(Method):
    name = "fd"
    description = "federated distillation: per-label average logits exchanged, distilled alongside CE"
    options = {
        "gamma": Option(1.0, "weight of the distillation term (paper value not found; our choice)",
                        interval="[0, inf)"),
        "temperature": Option(1.0, "softmax temperature of the distillation term (paper: none; our choice)",
                              interval="(0, inf)"),
        "exclude_own": Option(True, "a client's target excludes its own logits (FD's per-device average)"),
        "keep_old": Option(True, "server keeps every client's latest logits across rounds "
                                 "(false: only the previous round's uploads)"),
    }

    # ---- client: keeps F_k; distils toward the others' per-label logits -------------------
    def client_update(self, client, message, phase):
        model, c = client.model, client.num_classes
        dev = client.cfg.device
        table = torch.zeros(c, c, device=dev)  # target logits per label
        has = torch.zeros(c, dtype=torch.bool, device=dev)
        if "labels" in message:
            labels = message["labels"].to(dev)
            table[labels] = message["logits"].to(dev)
            has[labels] = True
        sums = torch.zeros(c, c, device=dev)  # plain tensors in the loss's closure: --batch-clients stacks them
        counts = torch.zeros(c, device=dev)

        def loss(x, y):
            logits = model(x)
            sums.index_add_(0, y, logits.detach().float())  # float(): bf16 under --precision bf16
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
            out = F.cross_entropy(logits, y)
            if self.gamma:
                out = out + self.gamma * distill_loss(logits, y, table, has, self.temperature)
            return out

        client.fit(model.parameters(), loss)
        held = torch.nonzero(counts > 0).flatten()
        return {"logits": (sums[held] / counts[held, None]).float(), "labels": held.to(torch.int64)}

    # ---- server: latest per-label logits of every client; per-client targets ------------
    def init_server(self, server):
        server.state["logits"] = {}  # cid -> (labels (n,), logits (n, C))

    def server_message(self, server, cid, phase):
        c = server.num_classes
        sums = torch.zeros(c, c, dtype=torch.float64)
        n = torch.zeros(c, dtype=torch.float64)
        for j, (labels, logits) in server.state["logits"].items():
            if self.exclude_own and j == cid:
                continue
            sums[labels.cpu()] += logits.cpu().to(torch.float64)
            n[labels.cpu()] += 1
        avail = torch.nonzero(n > 0).flatten()
        if len(avail) == 0:
            return {}
        return {"logits": (sums[avail] / n[avail, None]).float(), "labels": avail.to(torch.int64)}

    def aggregate(self, server, uploads, phase):
        if not self.keep_old:
            server.state["logits"] = {}
        for u in uploads:
            server.state["logits"][u.cid] = (u.message["labels"], u.message["logits"])
