"""Training augmentation of the paper's code lineage, on batched tensors:
random crop (pad 4), horizontal flip, random erasing (p=0.5, scale 0.04-0.2, ratio 0.5-2,
value 0 after normalisation, as torchvision's RandomErasing)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4, erase_p: float = 0.5,
            scale: tuple[float, float] = (0.04, 0.2), ratio: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    b, c, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=g.device).to(dev)

    # random crop with zero padding: gather a (h, w) window at a random offset per sample
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = (rand(b) * (2 * pad + 1)).long()
    ox = (rand(b) * (2 * pad + 1)).long()
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = xp[torch.arange(b, device=dev)[:, None, None, None],
             torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    # horizontal flip
    flip = rand(b) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    # random erasing: one rectangle per selected sample
    area = h * w * (scale[0] + rand(b) * (scale[1] - scale[0]))
    logr = math.log(ratio[0]) + rand(b) * (math.log(ratio[1]) - math.log(ratio[0]))
    ar = torch.exp(logr)
    eh = torch.sqrt(area * ar).round().long().clamp(1, h)
    ew = torch.sqrt(area / ar).round().long().clamp(1, w)
    y0 = (rand(b) * (h - eh + 1).float()).long()
    x0 = (rand(b) * (w - ew + 1).float()).long()
    yy = torch.arange(h, device=dev)[None, :, None]
    xx = torch.arange(w, device=dev)[None, None, :]
    mask = ((yy >= y0[:, None, None]) & (yy < (y0 + eh)[:, None, None])
            & (xx >= x0[:, None, None]) & (xx < (x0 + ew)[:, None, None]))
    mask &= (rand(b) < erase_p)[:, None, None]
    return out.masked_fill(mask[:, None], 0.0)
