"""pFedLoRA's adapter readings: what a homogeneous low-rank adapter can be in a heterogeneous zoo.

- LoRA (peft) on layers with the same type and weight shape in every model of the zoo
  (`auto`, or named layers such as `fc3`, `conv1,fc3`): W x + (alpha/r) B A x, B = 0 at start.
- `model`: a small homogeneous model run in parallel with the local model, its logits added to
  the local model's (the "low-rank model, a.k.a. adapter" form of the authors' later papers):
      stem: Conv2d(in_ch, 16, 5) -> ReLU -> MaxPool(2)   (the zoo's conv1 block)
      lora_A: Linear(flat, r, bias=False) -> ReLU          (the rank-r bottleneck)
      lora_B: Linear(r, C, bias=False), zero at start      (so a fresh adapter adds nothing)
  flat = 16 * 12 * 12 = 2,304 on 1x28x28 and 16 * 14 * 14 = 3,136 on 3x32x32: at r = 8 that is
  18,928 parameters on Fashion-MNIST (about 3.6% of CNN-5) and 0.25 MFLOPs per sample.
"""
from __future__ import annotations

import torch
from torch import nn

from mhpfl.errors import UserError
from mhpfl.methods.zoo import common_layers, layer_shapes, zoo_models
from mhpfl.models import zoo_archs


class ParallelAdapter(nn.Module):
    """The `model` reading: a small homogeneous CNN with a rank-r bottleneck; returns logits."""

    def __init__(self, in_shape, num_classes: int, rank: int):
        super().__init__()
        in_ch, h, w = in_shape
        # pool, then ReLU: the same values as ReLU then pool (models/__init__.py)
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 16, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True), nn.Flatten())
        self.lora_A = nn.Linear(parallel_flat(in_shape), rank, bias=False)
        self.lora_B = nn.Linear(rank, num_classes, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(torch.relu_(self.lora_A(self.stem(x))))


def parallel_flat(in_shape) -> int:
    _, h, w = in_shape
    return 16 * ((h - 4) // 2) * ((w - 4) // 2)


def lora_targets(reading: str, zoo: str, clients: int, in_shape, num_classes) -> list[str]:
    """The layers a LoRA reading adapts."""
    if reading == "auto":
        return common_layers(zoo_archs(zoo, clients), in_shape, num_classes)
    return [t.strip() for t in reading.split(",") if t.strip()]


def check_reading(reading: str, rank: int, cfg, info) -> None:
    """One-line UserError unless the reading exists in every model of the zoo with one shape
    and the rank fits it: 1 <= r <= min(d_in, d_out) of every adapted layer (conv: d_in =
    in_channels * kh * kw); for `model`, 1 <= r <= its flattened stem output."""
    where = f"pfedlora: --adapter {reading}"
    if reading == "model":
        top = parallel_flat(info.in_shape)
        if not 1 <= rank <= top:
            raise UserError(f"{where} needs --rank in [1, {top}] (got {rank})")
        return
    models = zoo_models(cfg.zoo, cfg.clients, info.in_shape, info.num_classes)
    shapes = {a: layer_shapes(m) for a, m in models.items()}
    common = common_layers(list(models), info.in_shape, info.num_classes)
    hint = (f"use model, auto or layers among {', '.join(common)} (identical in every model of the "
            f"'{cfg.zoo}' zoo)")
    layers = lora_targets(reading, cfg.zoo, cfg.clients, info.in_shape, info.num_classes)
    if not layers:
        raise UserError(f"{where}: no layer to adapt; {hint}")
    for name in layers:
        sigs = {s.get(name) for s in shapes.values()}
        if None in sigs or len(sigs) != 1:
            raise UserError(f"{where}: layer '{name}' is not in every model of the zoo with one shape; {hint}")
        kind, shape = sigs.pop()
        d_out, d_in = shape[0], int(torch.tensor(shape[1:]).prod())
        if not 1 <= rank <= min(d_in, d_out):
            raise UserError(f"{where} needs --rank in [1, {min(d_in, d_out)}] for {name} "
                            f"({kind} {d_in} -> {d_out}); got {rank}")
