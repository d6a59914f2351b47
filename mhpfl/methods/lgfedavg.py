"""LG-FedAvg (Liang et al. 2020, arXiv 2001.01523): local representation, global head.

Client k keeps: its heterogeneous model F_k. The *global* layers (--global-layers, default the
classifier fc3: 500 -> C) are shared by all clients; every other layer (conv1, conv2, fc1, fc2:
the representation) stays private.
One round on a participant:
  1. load the global layers received from the server into F_k;
  2. train all of F_k (private and global layers) for E local epochs, cross-entropy;
  3. upload only the global layers' tensors (fc3.weight (C, 500) and fc3.bias (C,), float32:
     (500*C + C)*4 bytes; 20,040 bytes for C = 10).
Server: global layers = average of the uploads weighted by training-sample counts (--weighting
samples, as the issue and FedAvg's rule ask; the official code takes an unweighted mean over
the sampled clients: --weighting uniform). It sends the same global layers to every participant
(the same bytes down as up). The first round sends the server's seeded initial layers.
Prediction: F_k with the global layers as last loaded and fine-tuned locally (the client's
personalized model after its last local update).

Which layers are global. The paper describes local representation layers and a global top; the
heterogeneous CNN zoo has exactly one top layer of identical shape in every architecture, the
classifier fc3 (fc2's input width differs), hence the default. Note: the official CIFAR-10 code
keeps the *last* `num_layers_keep=2` entries of `weight_keys` = [fc1, fc2, fc3, conv2, conv1]
global, i.e. conv1 and conv2, the opposite of the paper's text (LG-FedAvg issue #8, unresolved;
docs/sources.md B4). In our zoo conv2's width differs across models, so that choice cannot be
reproduced on the heterogeneous zoo; `--global-layers conv1,fc3` or (homogeneous zoo)
`conv1,conv2` are available. Every named layer must have the same parameter shapes in all the
zoo's architectures, else the run stops with a one-line error.

Warm-up. The official code starts LG-FedAvg from a FedAvg checkpoint. --warmup-rounds N (default
0: the pFedLoRA protocol trains every method from scratch for the same rounds) makes the first N
rounds average every layer that is identical across the zoo (plain FedAvg on the homogeneous zoo;
conv1 and fc3 on the heterogeneous one); bytes of those rounds grow accordingly.
"""
from __future__ import annotations

import functools

import torch.nn.functional as F

from mhpfl.engine import weighted_average
from mhpfl.errors import UserError
from mhpfl.methods.base import Method, Option
from mhpfl.methods.zoo import zoo_models
from mhpfl.models import zoo_archs


@functools.lru_cache(maxsize=16)
def zoo_parameter_shapes(zoo: str, clients: int, in_shape: tuple,
                         num_classes: int) -> tuple[dict[str, dict[str, tuple]], ...]:
    """For each distinct architecture of the zoo: layer name -> {parameter name: shape}. Built on
    the meta device once per zoo (`zoo_models`: no memory, no initialisation, no random draws);
    every client checks the layers at its set-up, and real models there cost 0.1 s per client
    (about a fifth of a round at full's N100 setting)."""
    out = []
    for m in zoo_models(zoo, clients, in_shape, num_classes).values():
        layers: dict[str, dict[str, tuple]] = {}
        for n, p in m.named_parameters():
            layer, _, pname = n.rpartition(".")
            layers.setdefault(layer, {})[pname] = tuple(p.shape)
        out.append(layers)
    return tuple(out)


def identical_layers(shapes) -> list[str]:
    """Layers whose parameters have the same names and shapes in every architecture."""
    first, *rest = shapes
    return [n for n, sig in first.items() if all(o.get(n) == sig for o in rest)]


class LGFedAvg(Method):
    name = "lgfedavg"
    description = "local representation layers, global classifier head (fc3) averaged weighted by samples"
    options = {
        "global_layers": Option("fc3", "comma-separated layers shared and averaged (the rest stay "
                                       "private); each must have the same shape in every zoo model"),
        "weighting": Option("samples", "server average weights: samples (training-sample counts) "
                                       "or uniform (official code)", choices=("samples", "uniform")),
        "warmup_rounds": Option(0, "first N rounds average every layer identical across the zoo "
                                   "(the official code starts from FedAvg); 0: none", interval="[0, inf)"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        if self.warmup_rounds < 0:
            raise UserError(f"lgfedavg: --warmup-rounds must be >= 0 (got {self.warmup_rounds})")

    def layers(self, cfg, info) -> tuple[list[str], list[str]]:
        """(global layers, layers identical across the zoo); validated against the zoo."""
        shapes = zoo_parameter_shapes(cfg.zoo, cfg.clients, tuple(info.in_shape), info.num_classes)
        names = [t.strip() for t in str(self.global_layers).split(",") if t.strip()]
        if not names:
            raise UserError("lgfedavg: --global-layers is empty; name at least one layer, e.g. fc3")
        for n in names:
            if n not in shapes[0]:
                raise UserError(f"lgfedavg: --global-layers names '{n}', which is no layer of the "
                                f"models; choose among {', '.join(shapes[0])}")
            if any(s.get(n) != shapes[0][n] for s in shapes[1:]):
                raise UserError(f"lgfedavg: layer '{n}' differs in shape across the {cfg.zoo} zoo "
                                f"and cannot be averaged; choose among "
                                f"{', '.join(identical_layers(shapes))}")
        return names, identical_layers(shapes)

    def shared_keys(self, model_keys, layers: list[str]) -> list[str]:
        return [k for k in model_keys if k.rpartition(".")[0] in layers]

    def layers_for_round(self, state, round_: int) -> list[str]:
        return state["common_layers"] if round_ <= self.warmup_rounds else state["global_layers"]

    # ---- client: keeps its whole model; the global layers are overwritten each round ------
    def init_client(self, client):
        glob, common = self.layers(client.cfg, client.info)  # fails early on a bad --global-layers
        client.state.update(global_layers=glob, common_layers=common)

    def client_update(self, client, message, phase):
        model = client.model
        model.load_state_dict(message, strict=False)  # (1) the global layers
        client.fit(model.parameters(), lambda x, y: F.cross_entropy(model(x), y))  # (2)
        keys = self.shared_keys(model.state_dict(), self.layers_for_round(client.state, client.round))
        state = model.state_dict()
        return {k: state[k] for k in keys}  # (3) only the global layers

    # ---- server: the global layers ----------------------------------------------------
    def init_server(self, server):
        glob, common = self.layers(server.cfg, server.info)
        server.state.update(global_layers=glob, common_layers=common)
        template = server.new_model(zoo_archs(server.cfg.zoo, 1)[0], tag="global")
        state = template.state_dict()
        server.state["global"] = {k: state[k] for k in self.shared_keys(state, common)}

    def server_message(self, server, cid, phase):
        keys = self.shared_keys(server.state["global"],
                                self.layers_for_round(server.state, server.round))
        return {k: server.state["global"][k] for k in keys}

    def aggregate(self, server, uploads, phase):
        if not uploads:
            return
        if self.weighting == "uniform":
            from mhpfl.messages import Upload

            uploads = [Upload(u.cid, 1, u.message) for u in uploads]
        server.state["global"].update(weighted_average(uploads))
