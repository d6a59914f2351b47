"""Start-up without what only torch.compile needs.

Three things in torch import torch._dynamo (and with it much of torch._inductor) although an
eager run never uses it: `torch.use_deterministic_algorithms` (to set an inductor flag), the
first call of torch.optim.Optimizer's add_param_group/zero_grad/state_dict (wrapped by
`torch._disable_dynamo`, which imports dynamo on first call only to mark them not compilable;
so is FlopCounterMode's __torch_dispatch__, used by the FLOP meter) and every optimizer step
(`_use_grad_for_differentiable` imports dynamo for a graph break).
That import costs 1-2 s on an idle core and 2-6 s on a loaded 2-core machine, more than the
rest of a run's start-up. All three are skipped here while torch._dynamo is not loaded; the
arithmetic is torch's own (tests/test_speed.py checks SGD bit for bit).
torch.utils.flop_counter also imports triton when it is installed (CUDA builds), 0.2-0.3 s, only
to recognise user-written triton kernels, which an eager run never has: `flop_counter()` loads
it without triton. Gradient clipping multiplies every gradient by 1 when nothing is clipped:
`clip_grad_norm` skips that. And glibc's malloc hands freed blocks back to the kernel, so every
batch's tensors fault their pages in again: `retain_freed_memory()` keeps them.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from types import ModuleType

import torch


def deterministic_algorithms(device: str = "cpu") -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without importing
    torch._inductor to set `torch._inductor.config.deterministic` (used by torch.compile only):
    the same C++ switch is flipped directly. On CUDA, cuBLAS also needs a fixed workspace for
    reproducible matmuls."""
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor" in sys.modules or switch is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        switch(True, warn_only=True)


def eager_optimizers() -> None:
    """Pre-fill the cache of torch._disable_dynamo's wrappers with the plain functions, so that
    creating an optimizer, or counting a step's FLOPs with FlopCounterMode (a TorchDispatchMode,
    whose __torch_dispatch__ torch wraps the same way), does not import torch._dynamo. Outside
    torch.compile the wrapper's only effect is that import; no-op once dynamo is loaded."""
    if "torch._dynamo" in sys.modules:
        return
    fc = flop_counter()
    from torch.utils._python_dispatch import TorchDispatchMode

    wrapped = [getattr(torch.optim.Optimizer, name, None) for name in
               ("add_param_group", "zero_grad", "state_dict", "load_state_dict", "_cuda_graph_capture_health_check")]
    wrapped += [c.__dict__.get("__torch_dispatch__") for c in vars(fc).values()
                if isinstance(c, type) and issubclass(c, TorchDispatchMode)]
    for fn in wrapped:
        inner = getattr(fn, "__wrapped__", None)
        if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
            inner.__dynamo_disable = inner


def flop_counter() -> ModuleType:
    """torch.utils.flop_counter, imported (once) with `import triton` failing unless triton is
    already loaded: the module then treats triton as absent, as it does on CPU builds (its
    FlopCounterMode counts every aten op the same; only the registration of FLOP formulas for
    triton kernels, which mhpfl never runs, is unavailable). Its "triton not found" warning is
    not emitted."""
    name = "torch.utils.flop_counter"
    if name in sys.modules or "triton" in sys.modules:
        import torch.utils.flop_counter as fc

        return fc
    log = logging.getLogger(name)
    disabled = log.disabled
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` raises ImportError
    log.disabled = True
    try:
        import torch.utils.flop_counter as fc
    finally:
        log.disabled = disabled
        if sys.modules.get("triton", 0) is None:
            del sys.modules["triton"]
    return fc


class SGD(torch.optim.SGD):
    """torch.optim.SGD, whose step() runs torch's own update under no_grad without the
    `import torch._dynamo` + graph break that torch's step wrapper adds for torch.compile (a
    no-op in eager mode). Falls back to torch's step if its layout changes.

    Weight decay is added to each gradient in place (`grad.add_(param, alpha=wd)`, the kernel
    torch runs as `grad.add(param, alpha=wd)` into a new tensor) and torch's update then runs
    with weight decay 0: the same arithmetic without allocating and writing a copy of every
    gradient (CNN-1: 2.5 M parameters per step). So after a step `p.grad` holds the decayed
    gradient; every caller zeroes gradients before the next backward."""

    _raw_step = getattr(torch.optim.SGD.step, "__wrapped__", None)

    def step(self, closure=None):
        if self._raw_step is None or self.defaults.get("differentiable") or "torch._dynamo" in sys.modules:
            return super().step(closure)
        with torch.no_grad():
            decayed = []
            for group in self.param_groups if closure is None else ():
                wd = group["weight_decay"]
                if wd and isinstance(wd, float) and not group["maximize"]:
                    for p in group["params"]:
                        if p.grad is not None and not p.grad.is_sparse:
                            p.grad.add_(p, alpha=wd)
                    group["weight_decay"] = 0.0
                    decayed.append((group, wd))
            try:
                return self._raw_step(closure)
            finally:
                for group, wd in decayed:
                    group["weight_decay"] = wd


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)`, without its multiplication of every
    gradient by min(max_norm / (norm + 1e-6), 1) when that factor is 1 (x * 1.0 is x, bit for bit):
    in most steps nothing is clipped, and the multiplication is a read and a write of every
    gradient. Done on CPU only, where reading the factor costs no device sync; elsewhere, or on
    a torch without `get_total_norm` (before 2.6), torch's own call."""
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if not grads or total_norm is None or grads[0].device.type != "cpu":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = total_norm(grads)
    if not float(float(max_norm) / (norm + 1e-6)) >= 1.0:  # clipped (or NaN), as torch would
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit (4 * 1024 * 1024 * sizeof(long))


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process: blocks up to 32 MiB come from the
    heap instead of fresh mmaps, and the heap is not trimmed back to the kernel. By default
    both happen between one batch's tensors and the next's, which then fault the same pages in
    again: a CNN-1 training step plus an evaluation batch (256 samples each), repeated 10 times,
    takes 39,000-53,000 page faults, 1,700-4,600 with this (tests/test_speed.py); a 6-round N10
    run (before the zoo's leaner forward pass) 2.0 million faults and 4 s
    of system time (of 27 s), 0.14 million and 0.5 s with it. The arithmetic is untouched; the
    process keeps its peak heap. Skipped (False) where malloc is not glibc's, or where the user
    tuned it (GLIBC_TUNABLES naming malloc, or MALLOC_* variables)."""
    if (platform.libc_ver()[0] != "glibc" or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def lean_startup(device: str = "cpu") -> None:
    """What `run` calls first: deterministic mode, optimizers without the dynamo import, freed
    memory kept by malloc."""
    deterministic_algorithms(device)
    eager_optimizers()
    retain_freed_memory()
