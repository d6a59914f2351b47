"""Server-side rules shared by several methods."""
from __future__ import annotations

import torch

from mhpfl.messages import Message, Upload


def weighted_average(uploads: list[Upload], keys: list[str] | None = None) -> Message:
    """Per-tensor average of the uploads weighted by the clients' training-sample counts."""
    if not uploads:
        return {}
    keys = list(uploads[0].message) if keys is None else keys
    weights = torch.tensor([u.num_samples for u in uploads], dtype=torch.float64)
    weights = weights / weights.sum()
    out = {}
    for k in keys:
        stacked = torch.stack([u.message[k].to(torch.float64) for u in uploads])
        w = weights.to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
        out[k] = (w * stacked).sum(0).to(uploads[0].message[k].dtype)
    return out
