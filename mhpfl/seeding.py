"""Seeding: every random stream is derived from (seed, purpose, ...) so results do not depend on
the order in which clients run or on how many other streams were used before."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(part) -> int:
    return part if isinstance(part, int) else zlib.crc32(str(part).encode())


def np_rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([seed, *(_key(k) for k in keys)])


def torch_gen(seed: int, *keys, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np_rng(seed, *keys).integers(0, 2**62)))
    return g


def seed_torch(seed: int, *keys) -> None:
    """Seed torch's global RNG (used by module initialisers) for one purpose."""
    torch.manual_seed(int(np_rng(seed, *keys).integers(0, 2**62)))

