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
        # sum_i w_i * x_i in float64, summed by torch over the stacked clients: the uploads stacked
        # as they are, then converted (a new buffer in the stack's layout, which decides the order
        # in which sum(0) adds), scaled and reduced in place. Bit for bit what stacking float64
        # copies, multiplying and summing gives, with half the memory traffic.
        first = uploads[0].message[k]
        stacked = torch.stack([u.message[k] for u in uploads])
        if stacked.dtype != torch.float64:
            stacked = stacked.to(torch.float64)
        stacked.mul_(weights.to(stacked.device).view(-1, *([1] * first.dim())))
        out[k] = stacked.sum(0).to(first.dtype)
    return out
