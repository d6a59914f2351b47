"""Training augmentation of the paper's code lineage, on batched tensors:
random crop (pad 4), horizontal flip, random erasing (p=0.5, scale 0.04-0.2, ratio 0.5-2,
value 0 after normalisation, as torchvision's RandomErasing).

Every output pixel is one read of the zero-padded images: the crop's offset, the flip and the
erased rectangle only decide *which* pixel (an erased one reads a padding pixel, which is 0), and
so does the epoch's shuffle. So `Split.batches` augments a whole epoch's batches (in chunks) with
one random draw, a little index arithmetic on (2, samples) tensors and one gather: on a GPU, where
a CIFAR step is bound by kernel launches rather than arithmetic, that is about 40 kernels an epoch
chunk instead of 60 for every batch. The values are those of cropping, flipping and erasing one
batch after another with 8 uniform draws per batch (tests/test_augment.py checks them against that
definition, bit for bit on CPU); the output is in the channels-last layout the models take. An
epoch in progress holds a padded copy of the client's images and one augmented chunk."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

DRAWS = 8  # uniform numbers per sample: crop row, crop column, flip, erase area, ratio, row, column, p
CHUNK = 4096  # samples of an epoch augmented at once (whole batches): bounds its index and image copies


@lru_cache(maxsize=None)
def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Positions 0..max(h, w)-1, the columns left to right and mirrored, and the (rows,
    columns) limits as a (2, 1) tensor with its lower bound 1, on `device` (made there: a copy
    from the host would wait for the device's queue)."""
    with torch.inference_mode(False):
        pos = torch.arange(max(h, w), device=device)
        lim = pos.new_full((2, 1), h)
        lim[1] = w
        return pos, pos[:w], pos[:w].flip(0), lim, torch.ones_like(lim)


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4, erase_p: float = 0.5,
            scale: tuple[float, float] = (0.04, 0.2), ratio: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    """Augment the batch `x` (B, C, H, W) with DRAWS x B uniform numbers drawn from `g`."""
    u = torch.rand(DRAWS, len(x), generator=g, device=g.device).to(x.device)
    return augment_drawn(padded_pixels(x, pad), u, None, pad, erase_p, scale, ratio)


def padded_pixels(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The images `x` (N, C, H, W) zero-padded by max(pad, 1) on every side, as (N, H', W', C)
    pixels (a copy with no re-layout for channels-last `x`)."""
    p = max(pad, 1)
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, p, p, p, p))


def augment_drawn(padded: torch.Tensor, u: torch.Tensor, take: torch.Tensor | None, pad: int = 4,
                  erase_p: float = 0.5, scale: tuple[float, float] = (0.04, 0.2),
                  ratio: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    """The augmented images `take` (indices; None: all) of `padded` (`padded_pixels` of the
    images), the i-th from the uniform numbers u[:, i] (u: DRAWS x len(take))."""
    n, hp, wp, c = padded.shape
    p = max(pad, 1)  # at least one padding pixel: erased pixels read it
    h, w, b = hp - 2 * p, wp - 2 * p, u.shape[1]
    pos, cols, mirrored, lim, one = _grid(h, w, padded.device)
    # random crop: the window's offset in the padded image (rows, columns)
    off = (u[:2] * (2 * pad + 1)).long()
    if p != pad:
        off = off + (p - pad)
    # horizontal flip: the window's columns read right to left
    src_cols = torch.where((u[2] < 0.5)[:, None], mirrored, cols) + off[1][:, None]  # (b, w)
    src = ((off[0][:, None] + pos[:h]) * wp)[:, :, None] + src_cols[:, None, :]  # (b, h, w)
    first = torch.arange(b, device=padded.device) if take is None else take  # each image's first pixel
    src = src + (first * (hp * wp))[:, None, None]
    # random erasing: one rectangle per selected sample, in the output's coordinates
    area = h * w * (scale[0] + u[3] * (scale[1] - scale[0]))
    ar = torch.exp(math.log(ratio[0]) + u[4] * (math.log(ratio[1]) - math.log(ratio[0])))
    side = torch.stack((area * ar, area / ar)).sqrt().round().long().clamp(one, lim)  # (2, b): height, width
    start = (u[5:7] * (lim - side + 1).float()).long()
    inside = (pos >= start[:, :, None]) & (pos < (start + side)[:, :, None])  # (2, b, max(h, w))
    erase = inside[0, :, :h, None] & inside[1, :, None, :w] & (u[7] < erase_p)[:, None, None]
    src = src.masked_fill(erase, 0)  # pixel 0: a padding pixel, 0
    # one gather from the padded images laid out (pixels, channels): channels-last out
    flat = padded.reshape(n * hp * wp, c)
    out = flat.gather(0, src.view(b * h * w, 1).expand(b * h * w, c))
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def epoch_draws(g: torch.Generator, n: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """DRAWS uniform numbers for each of an epoch's n samples (DRAWS x n, in the epoch's order),
    drawn as one call of `augment` per batch would draw them: batch after batch, each DRAWS x B."""
    flat = torch.rand(DRAWS * n, generator=g, device=g.device).to(device)
    full = n // batch_size * batch_size
    head = flat[:DRAWS * full].view(-1, DRAWS, batch_size).permute(1, 0, 2).reshape(DRAWS, full)
    return torch.cat((head, flat[DRAWS * full:].view(DRAWS, n - full)), 1) if full < n else head


def augmented_batches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, g: torch.Generator,
                      batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch's augmented batches of (x[order], y[order]) (order None: as they are), the same as
    `augment` on each batch in turn with `g`, computed CHUNK samples (whole batches) at a time."""
    n = len(x)
    u = epoch_draws(g, n, batch_size, x.device)
    padded = padded_pixels(x)
    y = y if order is None else y[order]
    step = max(1, CHUNK // batch_size) * batch_size
    for s in range(0, n, step):
        e = min(n, s + step)
        xs = (augment_drawn(padded[s:e], u[:, s:e], None) if order is None
              else augment_drawn(padded, u[:, s:e], order[s:e]))
        for t in range(s, e, batch_size):
            yield xs[t - s:t - s + batch_size], y[t:t + batch_size]
