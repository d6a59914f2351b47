"""Class prototypes: the mean representation (or logits) of each class, shared by FedProto, FedGH,
FedTGP and FD."""
from __future__ import annotations

import torch


def class_means(reps: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean representation of each class present in y, those classes ascending)."""
    sums = torch.zeros(num_classes, reps.shape[1], device=reps.device).index_add_(0, y, reps)
    counts = torch.bincount(y, minlength=num_classes)
    held = torch.nonzero(counts > 0).flatten()
    return (sums[held] / counts[held, None]).float(), held.to(torch.int64)


class ClassMeans:
    """Per-class running sums of what a model outputs while it trains (FedProto's
    representations, FD's logits), kept in float32 even when the outputs are bf16
    (`--precision bf16`)."""

    def __init__(self, num_classes: int, dim: int, device):
        self.sums = torch.zeros(num_classes, dim, device=device)
        self.counts = torch.zeros(num_classes, device=device)

    def add(self, values: torch.Tensor, y: torch.Tensor) -> None:
        self.sums.index_add_(0, y, values.detach().float())
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=self.counts.dtype))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of each class seen, those classes ascending), as `class_means` returns them."""
        held = torch.nonzero(self.counts > 0).flatten()
        return (self.sums[held] / self.counts[held, None]).float(), held.to(torch.int64)
