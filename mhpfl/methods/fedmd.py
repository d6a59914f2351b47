"""FedMD (Li & Wang 2019, arXiv 1910.03581): model distillation through class scores on public data.

Public data: the labelled public pool that no client owns (`client.public`): by default a slice
held out of the dataset's training pool as large as a client's mean private set (run settings
--public-size, scaled by --train-fraction, and --public heldout|DATASET). FedMD is the only
method here that uses data beyond the clients' own (`extra_data`): tables mark it, and the
headline compares pFedLoRA with the data-free baselines.

Client k keeps: its heterogeneous model F_k (never sent).
Set-up (transfer learning, once, when the client first participates; metered in that round):
train F_k on the labelled public pool for --transfer-public-epochs, then on its private data for
--transfer-private-epochs.
One round on a participant, in two phases:
  communicate: the server sends the round's public subset (indices, int64), drawn afresh each
      round with the server's seeded stream; the client uploads F_k's class scores (logits,
      subset x C float32) on it. Server: consensus = plain mean of the scores over the
      participants (including each one's own), as in the official code.
  digest: the server sends the consensus; the client trains F_k toward it on the subset
      (L1 / mean absolute error on logits) for --digest-epochs with batch --digest-batch,
      then revisits its private data (cross-entropy) for --revisit-epochs. Uploads nothing.
Prediction: F_k.
Bytes per participant and round: up = subset x C x 4; down = subset x 8 (indices) +
subset x C x 4 (consensus).

Defaults and their sources (official code, diogenes0319/FedMD_clean; docs/sources.md, B1):
- public_subset = 5000 (`N_alignment`, CIFAR and FEMNIST configs), capped at the public pool.
- digest: 1 epoch (`N_logits_matching_round`), batch 256, loss mean absolute error on the
  pre-softmax logits (the official model has its softmax removed for digest).
- revisit: the official code uses 4 private epochs (CIFAR) or 2 (FEMNIST) on a few samples
  per class; default 0 here means the run's --local-epochs, so that FedMD's private training
  per round matches every other method's E in the suite's tables.
- transfer learning: the official code trains on public data up to 20 epochs and then on
  private data up to 25 epochs, each with early stopping (on accuracy). We use fixed, affordable
  epoch counts instead (no early stopping): 5 public and 5 private epochs by default.
- Optimiser: the official code uses Adam (lr 1e-3); the suite's shared SGD (--lr, --momentum,
  --weight-decay) is used for every method here. Transfer-phase batches use --batch-size (the
  official code uses 128 public / 32 private).
The paper's public set may be a different dataset (e.g. CIFAR-10 public, CIFAR-100 private):
the run setting --public DATASET gives that (a seeded --public-size draw of that dataset's
training split); the default --public heldout is a slice of the same dataset's training pool.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mhpfl.errors import UserError
from mhpfl.methods.base import Method, Option


class FedMD(Method):
    name = "fedmd"
    description = "class scores on a public subset averaged into a consensus; clients digest it, then revisit private data"
    phases = ("communicate", "digest")
    extra_data = "labelled public data"
    options = {
        "public_subset": Option(5000, "public samples drawn per round for the consensus (capped at --public-size)",
                                interval="[1, inf)"),
        "digest_epochs": Option(1, "epochs of training toward the consensus on the public subset",
                                interval="[1, inf)"),
        "digest_batch": Option(256, "batch size of the digest phase", interval="[1, inf)"),
        "revisit_epochs": Option(0, "private epochs after digesting; 0 means the same as --local-epochs",
                                 interval="[0, inf)"),
        "transfer_public_epochs": Option(5, "transfer learning at first participation: epochs on the public pool",
                                         interval="[0, inf)"),
        "transfer_private_epochs": Option(5, "transfer learning at first participation: then epochs on private data",
                                          interval="[0, inf)"),
    }

    @staticmethod
    def _check_public(size: int) -> None:
        if size == 0:
            raise UserError("fedmd needs a public pool: set --public-size to a positive number "
                            "(at most --val-size; it is scaled by --train-fraction)")

    # ---- client: keeps F_k -------------------------------------------------------------
    def init_client(self, client):
        """Transfer learning, once at the first participation: public pool, then private data."""
        self._check_public(len(client.public))
        if self.transfer_public_epochs and int(client.public.y.max()) >= client.num_classes:
            raise UserError(f"fedmd: the public data's labels go beyond the clients' {client.num_classes} "
                            "classes and cannot train their heads; set --transfer-public-epochs 0 (public "
                            "data then serves the consensus only) or choose another --public")
        model = client.model

        def ce(x, y):
            return F.cross_entropy(model(x), y)

        if self.transfer_public_epochs:
            client.fit(model.parameters(), ce, epochs=self.transfer_public_epochs, data=client.public)
        if self.transfer_private_epochs:
            client.fit(model.parameters(), ce, epochs=self.transfer_private_epochs)

    def client_update(self, client, message, phase):
        model = client.model
        if phase == "communicate":
            subset = message["subset"]
            client.state["subset"] = subset
            return {"scores": client.infer(model, client.public.subset(subset)).float()}
        # digest, then revisit
        target = client.public.subset(client.state.pop("subset"), y=message["consensus"])
        client.fit(model.parameters(), lambda x, t: F.l1_loss(model(x), t),
                   epochs=self.digest_epochs, data=target, batch_size=self.digest_batch)
        client.fit(model.parameters(), lambda x, y: F.cross_entropy(model(x), y),
                   epochs=self.revisit_epochs or client.cfg.local_epochs)
        return {}

    # ---- server: the round's public subset and the consensus --------------------------
    def init_server(self, server):
        self._check_public(server.public_size)

    def subset_size(self, server) -> int:
        return min(self.public_subset, server.public_size)

    def server_message(self, server, cid, phase):
        if phase == "communicate":
            if server.state.get("subset_round") != server.round:  # one draw per round
                idx = server.rng.choice(server.public_size, self.subset_size(server), replace=False)
                server.state["subset"] = torch.as_tensor(np.sort(idx), dtype=torch.int64)
                server.state["subset_round"] = server.round
            return {"subset": server.state["subset"]}
        return {"consensus": server.state["consensus"]}

    def aggregate(self, server, uploads, phase):
        if phase == "communicate" and uploads:
            server.state["consensus"] = torch.stack([u.message["scores"] for u in uploads]).mean(0)
