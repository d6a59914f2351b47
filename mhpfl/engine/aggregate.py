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
        # sum_i w_i * x_i in float64, summed by torch over the stacked clients. One float64 buffer,
        # filled, scaled and reduced in place, laid out as torch.stack lays out the float64 copies
        # (channels-last weights stay so), so that sum(0) adds in the same order: bit for bit what
        # stacking, multiplying and summing copies gives, with a third of the memory traffic.
        first = uploads[0].message[k]
        if any(u.message[k].shape != first.shape for u in uploads):
            raise ValueError(f"cannot average '{k}': the uploads' shapes differ "
                             f"({sorted({tuple(u.message[k].shape) for u in uploads})})")
        layout = torch.stack([first.to(device="meta", dtype=torch.float64)] * len(uploads))
        stacked = torch.empty_strided(layout.shape, layout.stride(), dtype=torch.float64, device=first.device)
        for row, u in zip(stacked, uploads):
            row.copy_(u.message[k])
        stacked.mul_(weights.to(stacked.device).view(-1, *([1] * first.dim())))
        out[k] = stacked.sum(0).to(first.dtype)
    return out
