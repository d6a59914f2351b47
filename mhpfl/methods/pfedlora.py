"""pFedLoRA (Yi et al., arXiv 2310.13283): a homogeneous low-rank adapter per heterogeneous model.

Client k keeps: its heterogeneous local model F_k and its adapter G_k (the same shape on every
client).
One round on a participant:
  1. load the global adapter G received from the server;
  2. adapter frozen: train F_k (with G in its forward pass) for E local epochs, cross-entropy;
  3. F_k frozen: train the adapter for E_a epochs (--adapter-epochs, default E), cross-entropy;
  4. upload only the adapter tensors.
Server: G = average of the uploaded adapters weighted by training-sample counts.
Prediction: F_k with its own current adapter.

What the adapter is (--adapter) is not in what we can read of the paper (docs/sources.md A1);
the readings, each homogeneous across the zoo so that adapters average (mhpfl/methods/adapters.py):
  - `auto`: LoRA (peft) on every layer whose type and weight shape are the same in all
    architectures of the zoo: conv1 and fc3 in the heterogeneous CNN zoo, the FC layers in the
    homogeneous one;
  - layer names, e.g. `fc3` or `conv1,fc3`: LoRA on those layers ("fully connected layers" in the
    paper's summaries);
  - `model`: a small homogeneous CNN with a rank-r bottleneck run in parallel with F_k, its
    logits added to F_k's (the "low-rank model, a.k.a. adapter" of the abstract and of the
    authors' later papers).
LoRA initialisation follows LoRA/peft: A random (Kaiming), B = 0, so a fresh adapter leaves the
model unchanged (the `model` reading zeroes its last layer likewise); scaling alpha/r
(--lora-alpha, default r: scale 1). The rank must fit every adapted layer (1 <= r <=
min(d_in, d_out)); a bad reading or rank is refused before any data is loaded.
Default reading: `fc3`, rank 8, the best of the three readings on validation accuracy (by 0.04
points: the readings are indistinguishable at this scale), see docs/methods.md
("pFedLoRA's adapter").
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from mhpfl.engine import weighted_average
from mhpfl.methods.adapters import ParallelAdapter, check_reading, lora_targets
from mhpfl.methods.base import Method, Option
from mhpfl.methods.zoo import common_layers  # noqa: F401  (re-exported)
from mhpfl.models import zoo_archs
from mhpfl.seeding import seed_torch


class PFedLoRA(Method):
    name = "pfedlora"
    version = "2"
    description = "homogeneous low-rank adapter on each heterogeneous model; iterative local training, adapters averaged"
    options = {
        "adapter": Option("fc3", "the adapter: auto (LoRA on the layers identical across the zoo), "
                                  "layer names (LoRA on them, e.g. fc3 or conv1,fc3) or model (a small "
                                  "parallel low-rank model whose logits are added)"),
        "rank": Option(8, "adapter rank r (the bottleneck width for --adapter model)", interval="[1, inf)"),
        "lora_alpha": Option(0.0, "LoRA alpha (scaling alpha/r); 0 means alpha = r, scale 1", interval="[0, inf)"),
        "adapter_epochs": Option(0, "epochs of the adapter phase; 0 means the same as --local-epochs",
                                 interval="[0, inf)"),
    }

    def validate(self, cfg, info):
        check_reading(self.adapter, self.rank, cfg, info)  # the options' ranges: their `interval`

    # ---- the adapter: built, read and written the same way on clients and server -----
    def build(self, model: nn.Module, cfg, info, seed_key) -> tuple[nn.Module, nn.Module | None]:
        """(F_k with LoRA injected, None) or (F_k, the parallel model)."""
        if self.adapter == "model":
            seed_torch(cfg.seed, "init", *seed_key, "pfedlora-adapter")
            return model, ParallelAdapter(info.in_shape, info.num_classes, self.rank).to(cfg.device)
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets(self.adapter, cfg.zoo, cfg.clients, info.in_shape, info.num_classes)
        lora = LoraConfig(r=self.rank, lora_alpha=self.lora_alpha or self.rank, lora_dropout=0.0,
                          target_modules=targets, bias="none", init_lora_weights=True)
        return inject_adapter_in_model(lora, model), None

    @staticmethod
    def state(model: nn.Module, parallel: nn.Module | None) -> dict:
        if parallel is not None:
            sd = parallel.state_dict()
        else:
            from peft import get_peft_model_state_dict  # peft's import takes seconds: LoRA readings only

            sd = get_peft_model_state_dict(model)
        return {n: t.detach().clone() for n, t in sd.items()}

    @staticmethod
    def load(model: nn.Module, parallel: nn.Module | None, message) -> None:
        if parallel is not None:
            parallel.load_state_dict(message)
            return
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        loaded = set_peft_model_state_dict(model, message)
        if loaded.unexpected_keys or set(message) != set(get_peft_model_state_dict(model)):
            raise RuntimeError(f"pfedlora: received adapter does not match the client's: {sorted(message)}")

    @staticmethod
    def adapter_params(model: nn.Module, parallel: nn.Module | None = None):
        """(adapter parameters, local-model parameters)."""
        if parallel is not None:
            return list(parallel.parameters()), list(model.parameters())
        adapter, local = [], []
        for n, p in model.named_parameters():
            (adapter if "lora_" in n else local).append(p)
        return adapter, local

    @staticmethod
    def logits(model: nn.Module, parallel: nn.Module | None, x):
        return model(x) if parallel is None else model(x) + parallel(x)

    # ---- client: keeps F_k and its adapter ---------------------------------------------
    def init_client(self, client):
        client.model, parallel = self.build(client.model, client.cfg, client.info, ("client", client.cid))
        if parallel is None:
            client.track(client.model, label=f"{client.arch}+lora")
        else:
            client.state["parallel"] = client.track(parallel, label="pfedlora-adapter")

    def client_update(self, client, message, phase):
        model, parallel = client.model, client.state.get("parallel")
        self.load(model, parallel, message)  # (1) the global adapter
        adapter, local = self.adapter_params(model, parallel)

        def ce(x, y):
            return F.cross_entropy(self.logits(model, parallel, x), y)

        client.fit(local, ce)  # (2) adapter frozen: global knowledge into the local model
        client.fit(adapter, ce, epochs=self.adapter_epochs or client.cfg.local_epochs)  # (3)
        return self.state(model, parallel)  # (4) only the adapter

    def predict(self, client, x, head):
        return self.logits(client.model, client.state.get("parallel"), x)

    # ---- server: the global adapter ---------------------------------------------------
    def init_server(self, server):
        arch = zoo_archs(server.cfg.zoo, 1)[0]
        model, parallel = self.build(server.new_model(arch, tag="adapter"), server.cfg, server.info,
                                     ("server",))
        server.state["adapter"] = self.state(model, parallel)

    def server_message(self, server, cid, phase):
        return server.state["adapter"]

    def aggregate(self, server, uploads, phase):
        if uploads:
            server.state["adapter"] = weighted_average(uploads)
