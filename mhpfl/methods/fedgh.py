"""FedGH (Yi et al., ACM MM 2023, arXiv 2303.13137): a generalized global prediction header
trained on the server from the clients' per-class average representations.

Client k keeps: its heterogeneous model F_k = extractor f_k (up to the 500-d fc2 output) + head
fc3 (500 -> C), the same shape in every zoo model.
One round on a participant:
  1. replace its head with the global header H received from the server (round 1, before the
     server has trained H: keep its own head, as the released script does);
  2. train the whole model (extractor and head) with cross-entropy for E local epochs;
  3. with the trained model, compute the local averaged representation (prototype) of each class
     it holds, C_k[j] = mean of f_k(x) over its class-j training samples (one extra metered
     inference pass over its training data), and upload
        "protos" (n_held, 500) float32 and "labels" (n_held,) int64: n_held * 2008 bytes.
Server: keeps H (persistent across rounds) and trains it with cross-entropy on this round's
uploaded (prototype, label) pairs: --server-epochs passes, --server-batch pairs per SGD step, in
upload order (clients in order, classes ascending), SGD with the run's momentum, weight decay and
gradient clipping, learning rate --server-lr (0: the run's lr). Down: H's "weight" (C, 500) and
"bias" (C,) float32: (500 + 1) * C * 4 bytes (20,040 for C = 10).
Prediction: the client's model, i.e. its extractor with the header it received and fine-tuned
in its last round (the released script evaluates this model after local training).

Sources (docs/sources.md B8): the rule above is the paper's and the released script's
(LipingYi/FedGH, FedGH_mh.py): one pass over the pairs, one pair per step (--server-batch 1),
optimizer settings as the clients', clipping 50, the header replacing the local head, local
training of the whole model. The released script steps the wrong optimizer on the server (the
last client's optimizer, over that client's model parameters, not the header's), and never zeroes
the header's gradients, so its global header never changes from its initialisation; we implement
the paper's rule, under which the header does learn (tests/test_fedgh.py checks it). The script
averages per-batch class means; we take the exact class mean over the training data.
HtFLlib's FedGH trains the header in mini-batches (--server-batch = the run's batch size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhpfl.lean import SGD
from mhpfl.methods.base import Method, Option
from mhpfl.methods.prototypes import class_means
from mhpfl.methods.zoo import require_common_rep
from mhpfl.seeding import seed_torch


class FedGH(Method):
    name = "fedgh"
    description = "server trains a shared prediction header on the clients' class-mean representations"
    options = {
        "server_epochs": Option(1, "passes of the server over the round's uploaded prototypes (released script: 1)",
                                interval="[1, inf)"),
        "server_batch": Option(1, "prototypes per server SGD step (released script: 1; HtFLlib: the batch size)",
                               interval="[1, inf)"),
        "server_lr": Option(0.0, "server learning rate; 0 means the run's --lr (released script)",
                            interval="[0, inf)"),
    }

    def validate(self, cfg, info):
        require_common_rep(self.name, cfg, info)

    # ---- client: keeps F_k; its head is replaced by H each round ----------------------
    def client_update(self, client, message, phase):
        model = client.model
        if message:  # (1)
            model.fc3.load_state_dict(message)
        client.fit(model.parameters(), lambda x, y: F.cross_entropy(model(x), y))  # (2)
        train = client.data.train  # (3) prototypes of the trained model
        reps = client.infer(lambda x: model(x, return_rep=True)[1], train)
        protos, labels = class_means(reps, train.y, client.num_classes)
        return {"protos": protos, "labels": labels}

    # ---- server: the global header H --------------------------------------------------
    def init_server(self, server):
        seed_torch(server.cfg.seed, "init", "server", "fedgh-header")
        rep = require_common_rep(self.name, server.cfg, server.info)
        server.state["header"] = server.track(nn.Linear(rep, server.num_classes))
        server.state["trained"] = False

    def server_message(self, server, cid, phase):
        if not server.state["trained"]:
            return {}
        return {n: t.detach().clone() for n, t in server.state["header"].state_dict().items()}

    def aggregate(self, server, uploads, phase):
        if not uploads:
            return
        header, cfg = server.state["header"], server.cfg
        dev = next(header.parameters()).device
        protos = torch.cat([u.message["protos"].to(dev) for u in uploads])
        labels = torch.cat([u.message["labels"].to(dev) for u in uploads])
        train_header(header, protos, labels, epochs=self.server_epochs, batch=self.server_batch,
                     lr=self.server_lr or cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     clip=cfg.grad_clip)
        server.state["trained"] = True


def train_header(header: nn.Module, protos, labels, *, epochs, batch, lr, momentum, weight_decay, clip):
    """SGD on CE(header(prototype), label) over the pairs in order (server-side compute)."""
    opt = SGD(header.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    header.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for i in range(0, len(labels), batch):
                loss = F.cross_entropy(header(protos[i:i + batch]), labels[i:i + batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(header.parameters(), clip)
                opt.step()
