"""FML, Federated Mutual Learning (Shen et al. 2020, arXiv 2006.16765).

Client k keeps: its heterogeneous private model F_k (never sent) and a copy of the shared
homogeneous "meme" model M (--meme, default CNN-5, the smallest of the zoo).
One round on a participant:
  1. load the global meme received from the server;
  2. deep mutual learning on the private data, both models on the same batches for E local
     epochs (--local-epochs):
       L_local = alpha * CE(F_k) + (1 - alpha) * KL(p_meme || p_local)
       L_meme  = beta  * CE(M)   + (1 - beta)  * KL(p_local || p_meme)
     where in each KL the other model's output is detached, softmax without temperature and
     batch-mean reduction, as in the official code (src/Trainer.py, `train_mutual`);
  3. upload the meme's weights.
Server: meme = average of the uploaded memes weighted by training-sample counts (FedAvg).
Prediction: the private model F_k.

Defaults and their sources:
- alpha = beta = 0.5: official code (Args.py) [docs/sources.md, B3].
- meme = cnn5: our choice (the issue's; the paper's meme is a small shared model).
- The global meme starts identical on every client: the server builds it and sends it.

One `client.fit` call trains both parameter sets on L_local + L_meme. The two losses share no
parameters' gradients (each KL detaches the other model), so this equals the official two
optimizers stepping on the same batch; the only difference is that gradient-norm clipping
(--grad-clip, default 50) is applied to the joint norm of both models. It never acted in seed 0
of quick's N10 or full's N50 setting: the joint norm stayed under 17.4 (benchmarks/clip_count.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mhpfl.engine import weighted_average
from mhpfl.methods.base import Method, Option
from mhpfl.models import CNN_SPECS


def kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), batch-mean, target detached."""
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(target_logits.detach(), 1),
                    reduction="batchmean")


def mutual_losses(local_logits, meme_logits, y, alpha: float, beta: float):
    """(L_local, L_meme) of deep mutual learning for one batch."""
    local = alpha * F.cross_entropy(local_logits, y) + (1 - alpha) * kl(meme_logits, local_logits)
    meme = beta * F.cross_entropy(meme_logits, y) + (1 - beta) * kl(local_logits, meme_logits)
    return local, meme


class FML(Method):
    name = "fml"
    description = "private model + shared meme model trained by deep mutual learning; memes averaged"
    options = {
        "meme": Option("cnn5", "architecture of the shared meme model", choices=tuple(CNN_SPECS)),
        "alpha": Option(0.5, "weight of CE in the private model's loss (1-alpha: KL to the meme)", interval="[0, 1]"),
        "beta": Option(0.5, "weight of CE in the meme's loss (1-beta: KL to the private model)", interval="[0, 1]"),
    }

    # ---- client: keeps F_k (private) and its copy of the meme ------------------------
    def init_client(self, client):
        client.state["meme"] = client.new_model(self.meme, tag="meme")

    def client_update(self, client, message, phase):
        model, meme = client.model, client.state["meme"]
        meme.load_state_dict(message)

        def loss(x, y):
            local, shared = mutual_losses(model(x), meme(x), y, self.alpha, self.beta)
            return local + shared

        client.fit([*model.parameters(), *meme.parameters()], loss)
        return dict(meme.state_dict())

    # predict: the private model (Method.predict's default)

    # ---- server: the global meme -------------------------------------------------------
    def init_server(self, server):
        server.state["meme"] = dict(server.new_model(self.meme, tag="meme").state_dict())

    def server_message(self, server, cid, phase):
        return server.state["meme"]

    def aggregate(self, server, uploads, phase):
        if uploads:
            server.state["meme"] = weighted_average(uploads)
