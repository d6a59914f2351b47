"""pFedLoRA (Yi et al., arXiv 2310.13283): a homogeneous low-rank adapter per heterogeneous model.

Client k keeps: its heterogeneous local model F_k with a LoRA adapter G_k injected (peft).
One round on a participant:
  1. load the global adapter G received from the server;
  2. adapter frozen: train F_k (with G in its forward pass) for E local epochs, cross-entropy;
  3. F_k frozen: train the adapter for E_a epochs (--adapter-epochs, default E), cross-entropy;
  4. upload only the adapter tensors.
Server: G = average of the uploaded adapters weighted by training-sample counts.
Prediction: F_k with its own current adapter.

Where the adapter sits (--targets): the paper's summaries say "fully connected layers"; its
exact placement is not available to us. Default `auto` attaches it to every layer whose type
and weight shape are the same in all architectures of the zoo, so the adapter is homogeneous by
construction: conv1 and fc3 in the heterogeneous CNN zoo, and the FC layers (fc1, fc2, fc3) in
the homogeneous one. LoRA initialisation follows LoRA/peft: A random (Kaiming), B = 0, so a
fresh adapter leaves the model unchanged; scaling alpha/r (--lora-alpha, default r: scale 1).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from mhpfl.engine import weighted_average
from mhpfl.errors import UserError
from mhpfl.methods.base import Method, Option
from mhpfl.models import build_model, zoo_archs


def common_layers(archs: list[str], in_shape, num_classes) -> list[str]:
    """Layers (Linear/Conv2d) with the same type and weight shape in every architecture; in a
    homogeneous zoo, the Linear layers."""
    models = [build_model(a, in_shape, num_classes) for a in dict.fromkeys(archs)]

    def layers(m: nn.Module) -> dict[str, tuple]:
        return {n: (type(mod).__name__, tuple(mod.weight.shape)) for n, mod in m.named_modules()
                if isinstance(mod, (nn.Linear, nn.Conv2d))}

    if len(models) == 1:
        return [n for n, mod in models[0].named_modules() if isinstance(mod, nn.Linear)]
    first, *rest = [layers(m) for m in models]
    return [n for n, sig in first.items() if all(other.get(n) == sig for other in rest)]


class PFedLoRA(Method):
    name = "pfedlora"
    description = "homogeneous LoRA adapter on each heterogeneous model; iterative local training, adapters averaged"
    options = {
        "rank": Option(8, "adapter rank r"),
        "lora_alpha": Option(0.0, "LoRA alpha (scaling alpha/r); 0 means alpha = r, scale 1"),
        "targets": Option("auto", "comma-separated layers to adapt (e.g. fc3 or conv1,fc3); "
                                  "auto: layers identical in type and shape across the zoo"),
        "adapter_epochs": Option(0, "epochs of the adapter phase; 0 means the same as --local-epochs"),
    }

    def target_layers(self, cfg, info) -> list[str]:
        return (common_layers(zoo_archs(cfg.zoo, cfg.clients), info.in_shape, info.num_classes)
                if self.targets == "auto" else [t.strip() for t in self.targets.split(",") if t.strip()])

    def validate(self, cfg, info):
        """--targets must name Linear/Conv2d layers of every model in the zoo; --rank must lie in
        [1, min(d_in, d_out)] of every targeted layer (a higher rank cannot add anything)."""
        targets = self.target_layers(cfg, info)
        if not targets:
            raise UserError(f"pfedlora: --targets {self.targets!r} names no layer; use auto or layers among "
                            "conv1, conv2, fc1, fc2, fc3")
        full_rank: dict[str, int] = {}
        for arch in dict.fromkeys(zoo_archs(cfg.zoo, cfg.clients)):
            layers = dict(build_model(arch, info.in_shape, info.num_classes).named_modules())
            for t in targets:
                m = layers.get(t)
                if not isinstance(m, (nn.Linear, nn.Conv2d)):
                    raise UserError(f"pfedlora: --targets names '{t}', not a Linear or Conv2d layer of {arch}; "
                                    "use auto or layers among conv1, conv2, fc1, fc2, fc3")
                d_out, d_in = m.weight.shape[0], m.weight[0].numel()
                full_rank[t] = min(full_rank.get(t, d_in), d_in, d_out)
        hi = min(full_rank.values())
        if not 1 <= self.rank <= hi:
            sizes = ", ".join(f"{t} {r}" for t, r in full_rank.items())
            raise UserError(f"pfedlora: --rank must be in [1, {hi}], min(d_in, d_out) of the targeted layers "
                            f"({sizes}) (got {self.rank})")
        if not self.lora_alpha >= 0:
            raise UserError(f"pfedlora: --lora-alpha must be >= 0 (0: alpha = rank) (got {self.lora_alpha})")
        if self.adapter_epochs < 0:
            raise UserError(f"pfedlora: --adapter-epochs must be >= 0 (0: --local-epochs) (got {self.adapter_epochs})")

    def lora_config(self, cfg, info):
        from peft import LoraConfig

        targets = self.target_layers(cfg, info)
        return LoraConfig(r=self.rank, lora_alpha=self.lora_alpha or self.rank, lora_dropout=0.0,
                          target_modules=targets, bias="none", init_lora_weights=True)

    def inject(self, model: nn.Module, cfg, info) -> nn.Module:
        from peft import inject_adapter_in_model

        try:
            return inject_adapter_in_model(self.lora_config(cfg, info), model)
        except ValueError as e:
            raise UserError(f"pfedlora: cannot place the adapter on --targets {self.targets} "
                            f"({str(e).splitlines()[0]}); name layers among conv1, conv2, fc1, fc2, fc3") from None

    @staticmethod
    def adapter_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        adapter, local = [], []
        for n, p in model.named_parameters():
            (adapter if "lora_" in n else local).append(p)
        return adapter, local

    # ---- client: keeps F_k with its adapter -----------------------------------------
    def init_client(self, client):
        client.model = self.inject(client.model, client.cfg, client.info)
        client.track(client.model, label=f"{client.arch}+lora")

    def client_update(self, client, message, phase):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = client.model
        loaded = set_peft_model_state_dict(model, message)  # (1) the global adapter
        if loaded.unexpected_keys or set(message) != set(get_peft_model_state_dict(model)):
            raise RuntimeError(f"pfedlora: received adapter does not match the client's: {sorted(message)}")
        adapter, local = self.adapter_params(model)

        def ce(x, y):
            return F.cross_entropy(model(x), y)

        client.fit(local, ce)  # (2) adapter frozen: global knowledge into the local model
        client.fit(adapter, ce, epochs=self.adapter_epochs or client.cfg.local_epochs)  # (3)
        return dict(get_peft_model_state_dict(model))  # (4) only the adapter

    # ---- server: the global adapter ---------------------------------------------------
    def init_server(self, server):
        from peft import get_peft_model_state_dict

        template = self.inject(server.new_model(zoo_archs(server.cfg.zoo, 1)[0], tag="adapter"),
                               server.cfg, server.info)
        server.state["adapter"] = dict(get_peft_model_state_dict(template))

    def server_message(self, server, cid, phase):
        return server.state["adapter"]

    def aggregate(self, server, uploads, phase):
        if uploads:
            server.state["adapter"] = weighted_average(uploads)
