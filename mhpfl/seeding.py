"""Seeding: every random stream is derived from (seed, purpose, ...) so results do not depend on
the order in which clients run or on how many other streams were used before."""
from __future__ import annotations

import os
import sys
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


def deterministic_algorithms(device: str = "cpu") -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its one side effect that
    costs start-up time: it imports torch._inductor (and with it torch._dynamo, ~2 s) only to set
    `torch._inductor.config.deterministic`, which matters only to torch.compile. If inductor is
    already loaded (a compiled run), the public call is used; otherwise the same C++ switch is
    flipped directly. On CUDA, cuBLAS also needs a fixed workspace for reproducible matmuls."""
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor" in sys.modules or switch is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        switch(True, warn_only=True)
