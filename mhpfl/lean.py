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
it without triton. fvcore's FlopCountAnalysis comes without fvcore.nn's package init
(`fvcore_flop_count()`, 0.05 s). Gradient clipping multiplies every gradient by 1 when nothing
is clipped: `clip_grad_norm` skips that. And glibc's malloc hands freed blocks back to the
kernel, so every batch's tensors fault their pages in again: `retain_freed_memory()` keeps them.
SGD does not copy the gradients and runs its later steps in one pass over memory (`SGD`,
`mhpfl.fused_sgd`), and the FLOP meter counts a step's total with
FlopCounterMode minus its per-module bookkeeping (`total_flop_counter`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys
from types import ModuleType

import torch

from mhpfl import fused_sgd


def deterministic_algorithms(device: str = "cpu") -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without importing
    torch._inductor to set `torch._inductor.config.deterministic` (used by torch.compile only):
    the same C++ switch is flipped directly. On CUDA, cuBLAS also needs a fixed workspace for
    reproducible matmuls, and TF32 is turned off: PyTorch lets cuDNN run fp32 convolutions in TF32
    (10-bit mantissa) by default, so an fp32 run on a GPU would not compute in fp32 (what
    `--precision` records), and batched and one-at-a-time training would part by more than fp32
    rounding (FedMD's l1 digest by 6e-3, measured on an H200)."""
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
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
    _unwrap_dynamo_disable(wrapped)


def _unwrap_dynamo_disable(fns: list) -> None:
    """Make torch._disable_dynamo's wrappers of `fns` call the plain function without importing
    torch._dynamo first (see `eager_optimizers`)."""
    for fn in fns:
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


@functools.cache
def fvcore_flop_count() -> ModuleType:
    """fvcore.nn.flop_count (FlopCountAnalysis), imported without running fvcore.nn's package
    init, which also imports its losses (compiling two with TorchScript), precise BN and the
    parameter tables (with tabulate): 0.05 s of a run's start-up that the FLOP meter never uses.
    A stand-in `fvcore.nn` package is present only during this import, and the submodules loaded
    under it are then dropped from sys.modules, so a later `import fvcore.nn` anywhere runs the
    real package from scratch (tested); this module keeps its own copy."""
    if "fvcore.nn" in sys.modules:
        import fvcore.nn.flop_count  # noqa: F401

        return sys.modules["fvcore.nn.flop_count"]
    import importlib.machinery
    import importlib.util

    import fvcore

    spec = importlib.machinery.ModuleSpec("fvcore.nn", None, is_package=True)
    spec.submodule_search_locations = [os.path.join(os.path.dirname(fvcore.__file__), "nn")]
    sys.modules["fvcore.nn"] = importlib.util.module_from_spec(spec)
    try:
        importlib.import_module("fvcore.nn.flop_count")
        return sys.modules["fvcore.nn.flop_count"]
    finally:
        for name in [m for m in sys.modules if m == "fvcore.nn" or m.startswith("fvcore.nn.")]:
            del sys.modules[name]


def _compiling() -> bool:
    """Whether torch.compile (or export) is tracing this call."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return "torch._dynamo" in sys.modules if is_compiling is None else is_compiling()


class SGD(torch.optim.SGD):
    """torch.optim.SGD, whose step() runs torch's own update under no_grad without the
    `import torch._dynamo` + graph break that torch's step wrapper adds for torch.compile (a
    no-op in eager mode). Falls back to torch's step if its layout changes, and inside
    torch.compile's tracing (`torch.compiler.is_compiling`; on a torch without it, once
    torch._dynamo is loaded). Not merely once torch._dynamo is loaded: the first
    `torch.func.vmap` (the batched engine) loads it, and every later step would run torch's.

    Two copies of the gradients are not made; the arithmetic is torch's, bit for bit (tested):
    - weight decay is added to the gradients in place (`torch._foreach_add_(grads, params,
      alpha=wd)`: one kernel on a GPU, `grad.add_(param, alpha=wd)` per tensor on CPU; torch runs
      the same arithmetic into new tensors), and torch's update then runs with weight decay 0
      (CNN-1: 2.0 M parameters on Fashion-MNIST, 2.6 M on CIFAR, per step not allocated and
      written);
    - at the first step with momentum, torch's buffer is a copy of the (decayed) gradient and the
      parameter moves by -lr times it: here torch's update runs with momentum 0, which moves the
      parameter by -lr times the gradient itself, and the gradient tensor becomes the buffer
      (one copy of every parameter per `Client.fit` not made).
    So after the first step `p.grad` is None, and after a later one it holds the decayed
    gradient; every caller sets gradients anew before the next step.
    Later steps with momentum run in one pass per parameter where `mhpfl.fused_sgd` can (its
    arithmetic is torch's four passes', bit for bit: checked on the machine before use, and
    tested); the gradient is then left as it was."""

    _raw_step = getattr(torch.optim.SGD.step, "__wrapped__", None)

    def step(self, closure=None):
        if self._raw_step is None or self.defaults.get("differentiable") or _compiling():
            return super().step(closure)
        with torch.no_grad():
            if closure is None and self._fused_step():
                return None
            decayed, adopted = [], []
            for group in self.param_groups if closure is None else ():
                grads = [p for p in group["params"] if p.grad is not None]
                if group["maximize"] or group.get("fused") or any(p.grad.is_sparse for p in grads):
                    continue
                wd, momentum = group["weight_decay"], group["momentum"]
                if wd and isinstance(wd, float):  # one kernel on a GPU, add_ per tensor on CPU
                    torch._foreach_add_([p.grad for p in grads], grads, alpha=wd)
                    group["weight_decay"] = 0.0
                    decayed.append((group, wd))
                if (momentum and isinstance(momentum, float) and not group["nesterov"] and grads
                        and not any("momentum_buffer" in self.state.get(p, ()) for p in grads)):
                    group["momentum"] = 0.0
                    adopted.append((group, momentum, grads))
            try:
                return self._raw_step(closure)
            finally:
                for group, wd in decayed:
                    group["weight_decay"] = wd
                for group, momentum, grads in adopted:
                    group["momentum"] = momentum
                    for p in grads:
                        self.state[p]["momentum_buffer"], p.grad = p.grad, None

    def _fused_step(self) -> bool:
        """Every group's update through `fused_sgd`, if every group has momentum (no Nesterov,
        no dampening, plain float hyperparameters) and every parameter with a gradient has a
        momentum buffer, and the kernel takes them all; else False, nothing changed."""
        if not fused_sgd.enabled():
            return False
        updates = []
        for group in self.param_groups:
            wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
            if (group["maximize"] or group.get("fused") or group.get("foreach") or group["nesterov"]
                    or group["dampening"] or not momentum
                    or not all(type(v) in (int, float) for v in (wd, momentum, lr))):
                return False
            triples = []
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state.get(p, {}).get("momentum_buffer")
                    if buf is None or p.grad.is_sparse:
                        return False
                    triples.append((p, p.grad, buf))
            update = fused_sgd.prepare(triples, float(wd), float(momentum), float(lr))
            if update is None:
                return False
            updates.append(update)
        for update in updates:
            update()
        return True


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether the host may read a value of `t` (a Python branch on it) at no cost: on CPU. On an
    accelerator such a read waits for every queued kernel, so code inside a training step takes a
    sync-free path there (the same value up to float rounding). Tests force that path on CPU
    through this function (tests/test_speed.py counts the host reads inside every method's steps)."""
    return t.device.type == "cpu"


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)`, without its multiplication of every
    gradient by min(max_norm / (norm + 1e-6), 1) when that factor is 1 (x * 1.0 is x, bit for bit):
    in most steps nothing is clipped, and the multiplication is a read and a write of every
    gradient. Done where reading the factor costs no device sync (`host_reads_are_free`: CPU);
    elsewhere, or on a torch without `get_total_norm` (before 2.6), torch's own call."""
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if not grads or total_norm is None or not host_reads_are_free(grads[0]):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = total_norm(grads)
    if not float(float(max_norm) / (norm + 1e-6)) >= 1.0:  # clipped (or NaN), as torch would
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


class _NoModules:
    """A stand-in for FlopCounterMode's ModuleTracker that tracks nothing: every count goes to
    "Global", the only entry `get_total_flops` reads."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_NoModules":
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _runs_as_is(func) -> bool:
    """Whether FlopCounterMode's dispatch runs `func` unchanged and counts it: an aten op
    overload returning tensors (not one of the metadata queries it declines) with no
    CompositeImplicitAutograd kernel (which it would run instead, decomposed)."""
    if not isinstance(func, torch._ops.OpOverload) or not all(
            isinstance(r.type, torch.TensorType) for r in func._schema.returns):
        return False
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key not in func.py_kernels and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


_TOTAL_COUNTER: type | None | bool = None


def _total_counter_class() -> type | None:
    """FlopCounterMode, entering a dispatch mode that remembers, per op, whether torch's would
    run it unchanged (`_runs_as_is`) and then runs and counts it directly. Torch's mode asks
    that again on every op: it builds a set of 15 ops to compare against, then looks for a
    decomposition (never found for the ops of a training step: every one runs as is). None when
    torch's internals differ from what this relies on."""
    global _TOTAL_COUNTER
    if _TOTAL_COUNTER is None:
        fc = flop_counter()
        base = getattr(fc, "_FlopCounterMode", None)
        if base is None or not hasattr(fc.FlopCounterMode(display=False), "mod_tracker"):
            _TOTAL_COUNTER = False
            return None

        class _Mode(base):
            as_is: dict = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                as_is = self.as_is.get(func)
                if as_is is None:
                    as_is = self.as_is[func] = _runs_as_is(func)
                if not as_is:
                    return super().__torch_dispatch__(func, types, args, kwargs)
                kwargs = kwargs or {}
                return self.counter._count_flops(func._overloadpacket, func(*args, **kwargs), args, kwargs)

        class _Counter(fc.FlopCounterMode):
            def __enter__(self):
                self.flop_counts.clear()
                self.mode = _Mode(self)
                self.mode.__enter__()
                return self

            def __exit__(self, *args):
                mode, self.mode = self.mode, None
                return mode.__exit__(*args)

        if "torch._dynamo" not in sys.modules:
            _unwrap_dynamo_disable([_Mode.__dict__["__torch_dispatch__"]])
        _TOTAL_COUNTER = _Counter
    return _TOTAL_COUNTER or None


def total_flop_counter():
    """torch's FlopCounterMode (display off) for a total count only, at half its overhead.
    Its ModuleTracker is left out: it attributes each count to the modules running it, through a
    global forward pre- and post-hook on every module call and autograd hooks on their inputs
    and outputs, and the total does not need it. Torch's checks of each op are made once per op
    (`_total_counter_class`). The same ops run, in the same order, on the same kernels, and are
    counted by torch's own formulas (`_count_flops`), so the count is torch's (tested). A
    metered CNN-1 training step (batch 64) costs about 2.8 ms more than an unmetered one, where
    FlopCounterMode costs about 5.3 ms more. Falls back to FlopCounterMode itself if its
    internals change."""
    cls = _total_counter_class()
    if cls is None:
        return flop_counter().FlopCounterMode(display=False)
    fc = cls(display=False)
    fc.mod_tracker = _NoModules()
    return fc


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
