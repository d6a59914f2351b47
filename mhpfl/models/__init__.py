"""The authors' CNN model zoo (CNN-1..CNN-5) used across their MHPFL papers.

Every variant is conv(5x5)->ReLU->pool -> conv(5x5)->ReLU->pool -> fc1 -> ReLU -> fc2 -> ReLU
(500-d representation) -> fc3 (500 -> C). Variants differ in conv2 width and fc1 size. Module
names (conv1, conv2, fc1, fc2, fc3) are stable: methods address layers by these names.

The forward pass pools before the ReLU, in place: max-pooling and ReLU commute exactly (ReLU is
monotone), in values and in gradients, and the ReLU then touches a quarter of the elements and
allocates nothing (CNN-5's training step 8% faster, CNN-1's evaluation about 10%); without
gradients it pools by elementwise maxima (`max_pool2`). Seeded runs are bit for bit the same.

Models are built in channels-last memory format (conv kernels NHWC): on CPU (oneDNN) the
convolutions and max-pooling run about 1.5-2x faster than in NCHW, on GPU cuDNN prefers it too.
Values are the same up to float rounding; parameters keep their shapes and names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhpfl.errors import UserError

REP_DIM = 500

# name -> (conv2 channels, fc1 width); fc2 maps fc1 width -> 500 in every variant.
CNN_SPECS: dict[str, tuple[int, int]] = {
    "cnn1": (32, 2000),
    "cnn2": (16, 2000),
    "cnn3": (32, 1000),
    "cnn4": (32, 800),
    "cnn5": (32, 500),
}
ZOOS = {
    "hetero": "client i uses CNN-((i mod 5)+1)",
    "homo": "every client uses CNN-1",
}


class CNN(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, conv2: int, fc1: int):
        super().__init__()
        in_ch, h, w = in_shape
        self.conv1 = nn.Conv2d(in_ch, 16, 5)
        self.conv2 = nn.Conv2d(16, conv2, 5)
        flat = conv2 * ((((h - 4) // 2) - 4) // 2) * ((((w - 4) // 2) - 4) // 2)
        self.fc1 = nn.Linear(flat, fc1)
        self.fc2 = nn.Linear(fc1, REP_DIM)
        self.fc3 = nn.Linear(REP_DIM, num_classes)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(max_pool2(self.conv1(x)))  # = pool(relu(conv1(x))), see the module's doc
        x = torch.relu_(max_pool2(self.conv2(x)))
        x = torch.relu_(self.fc1(x.flatten(1)))
        return torch.relu_(self.fc2(x))

    def forward(self, x: torch.Tensor, return_rep: bool = False):
        """Logits, or (logits, 500-d representation) with return_rep=True.

        Call the model itself (not `represent`) so the FLOP meter sees every pass.
        """
        rep = self.represent(x)
        logits = self.fc3(rep)
        return (logits, rep) if return_rep else logits


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """`F.max_pool2d(x, 2)`. With gradients off (evaluation, inference) as two elementwise maxima
    of strided views: the same values bit for bit (a max is exact), 3x faster on CPU in
    channels-last, and no argmax indices written. With gradients on, max_pool2d itself: its
    gradient goes to the first maximum of a window, where torch.maximum would split it between
    ties (frequent: constant image backgrounds). Under a TorchScript trace (fvcore's FLOP analysis
    of each model, at start-up) max_pool2d too: one op to trace instead of a dozen views and maxima
    (the analysis 4x faster; neither counts FLOPs in fvcore)."""
    if torch.is_grad_enabled() or torch.jit.is_tracing():
        return F.max_pool2d(x, 2)
    n, c, h, w = x.shape
    v = x[:, :, : h // 2 * 2, : w // 2 * 2].permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c)
    rows = torch.maximum(v[:, :, 0], v[:, :, 1])
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int) -> CNN:
    if arch not in CNN_SPECS:
        raise UserError(f"unknown model '{arch}'; choose one of {', '.join(CNN_SPECS)}")
    conv2, fc1 = CNN_SPECS[arch]
    return CNN(in_shape, num_classes, conv2, fc1).to(memory_format=torch.channels_last)


def zoo_archs(zoo: str, num_clients: int) -> list[str]:
    """Architecture name of every client in a zoo."""
    if zoo == "hetero":
        names = list(CNN_SPECS)
        return [names[i % len(names)] for i in range(num_clients)]
    if zoo == "homo":
        return ["cnn1"] * num_clients
    raise UserError(f"unknown zoo '{zoo}'; choose one of {', '.join(ZOOS)}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
