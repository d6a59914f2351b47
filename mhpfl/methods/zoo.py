"""What the methods need to know about a zoo before any data is loaded: the shapes its models
share (representation size, layers of the same type and shape). Models are built on torch's
meta device: shapes without memory or initialisation cost."""
from __future__ import annotations

import torch
from torch import nn

from mhpfl.errors import UserError
from mhpfl.models import build_model, zoo_archs


def zoo_models(zoo: str, clients: int, in_shape, num_classes) -> dict[str, nn.Module]:
    """One model per distinct architecture of the zoo (on the meta device)."""
    with torch.device("meta"):
        return {a: build_model(a, in_shape, num_classes) for a in dict.fromkeys(zoo_archs(zoo, clients))}


def rep_dims(zoo: str, clients: int, in_shape, num_classes) -> dict[str, int]:
    """Size of each architecture's representation (the input of its head), from a forward pass of
    one sample on CPU through uninitialised weights (empty CPU tensors assigned in place of the
    meta ones: no initialisation, no random numbers drawn). Not on the meta device: its linear
    layers run torch's Python decompositions, whose first call imports torch._dynamo (1-2 s).
    Not with `to_empty` either: for channels-last weights it runs torch's Python `empty_like`,
    which imports sympy (0.5-0.9 s)."""
    out = {}
    for arch, m in zoo_models(zoo, clients, in_shape, num_classes).items():
        m.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype) for k, v in m.state_dict().items()},
                          assign=True)
        with torch.inference_mode():
            _, rep = m(torch.zeros(1, *in_shape), return_rep=True)
        out[arch] = int(rep.shape[-1])
    return out


def require_common_rep(method: str, cfg, info) -> int:
    """The representation size every model of the run's zoo shares; UserError if they differ."""
    dims = rep_dims(cfg.zoo, cfg.clients, info.in_shape, info.num_classes)
    if len(set(dims.values())) != 1:
        sizes = ", ".join(f"{a}: {d}" for a, d in dims.items())
        raise UserError(f"{method} needs one representation size across the zoo, but the '{cfg.zoo}' "
                        f"zoo has {sizes}; use a zoo whose models share it")
    return next(iter(dims.values()))


def layer_shapes(m: nn.Module) -> dict[str, tuple]:
    """Linear/Conv2d layers of a model: name -> (type, weight shape)."""
    return {n: (type(mod).__name__, tuple(mod.weight.shape)) for n, mod in m.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d))}


def common_layers(archs: list[str], in_shape, num_classes) -> list[str]:
    """Layers (Linear/Conv2d) with the same type and weight shape in every architecture; in a
    homogeneous zoo, the Linear layers."""
    with torch.device("meta"):
        models = [build_model(a, in_shape, num_classes) for a in dict.fromkeys(archs)]
    if len(models) == 1:
        return [n for n, mod in models[0].named_modules() if isinstance(mod, nn.Linear)]
    first, *rest = [layer_shapes(m) for m in models]
    return [n for n, sig in first.items() if all(other.get(n) == sig for other in rest)]
