"""Class prototypes: the mean representation of each class, shared by FedProto, FedGH, FedTGP."""
from __future__ import annotations

import torch


def class_means(reps: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean representation of each class present in y, those classes ascending)."""
    sums = torch.zeros(num_classes, reps.shape[1], device=reps.device).index_add_(0, y, reps)
    counts = torch.bincount(y, minlength=num_classes)
    held = torch.nonzero(counts > 0).flatten()
    return (sums[held] / counts[held, None]).float(), held.to(torch.int64)
