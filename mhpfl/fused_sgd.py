"""SGD's momentum step in one pass over memory, bit for bit torch's four passes.

After its first step, torch.optim.SGD with momentum and weight decay runs four elementwise
passes over every parameter (the decayed gradient, the buffer times momentum, plus the decayed
gradient, the parameter update). Each reads and writes whole tensors: for CNN-1's 2.0 M
parameters about 88 MB of memory traffic a step, where one pass needs 40 MB. No torch op does
it in one pass with the same roundings (`fused=True` rounds differently: results would move),
so a 20-line C loop does (`sgd_step.c`). It is compiled at the first step that can use it
with the system's C compiler (`$CC`, else `cc`; about 0.07 s, into a temporary folder, once per
process, for this CPU), loaded with ctypes, and used only after it reproduced torch's passes
bit for bit on this machine, for the step's hyperparameters, on test vectors of every length
remainder (`kernel`). A CNN-1 step (batch 64, one thread) then spends 0.8-1.3 ms instead of
1.6-1.9 ms in the optimizer, about 5% of the step (benchmarks/test_sgd.py, docs/performance.md).

Used for CPU float32 parameters whose gradient and buffer have the parameter's strides, with one
torch thread (torch parallelises its own passes over its threads); everywhere else, without a C
compiler, or with MHPFL_FUSED_SGD=0, torch's passes run. The results are the same either way.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("sgd_step.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
CHECK_LENGTHS = (*range(1, 66), 1000, 4099)  # every remainder modulo a vector loop's 16, 32 or 64 lanes

_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_checked: dict[tuple[float, float, float], bool] = {}


def enabled() -> bool:
    return os.environ.get("MHPFL_FUSED_SGD", "1") != "0"


def _compile() -> ctypes.CDLL | bool:
    """The kernel built for this CPU and loaded, or False. Built in a temporary folder (then under
    ~/.cache where the temporary one does not allow executable mappings: a noexec /tmp)."""
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or "cc"]
    for parent in (None, Path.home() / ".cache"):
        try:
            if parent is not None:
                parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="mhpfl-sgd-", dir=parent) as tmp:
                out = Path(tmp) / "sgd_step.so"
                for flags in (FLAGS, tuple(f for f in FLAGS if f != "-march=native")):
                    if subprocess.run([*cc, *flags, "-o", str(out), str(SOURCE)], capture_output=True,
                                      timeout=60).returncode == 0:
                        break
                else:
                    return False  # no compiler that builds it
                lib = ctypes.CDLL(str(out))  # stays mapped once the folder is removed
        except (OSError, subprocess.SubprocessError):
            continue
        fn = lib.mhpfl_sgd_momentum
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int,
                       ctypes.c_float, ctypes.c_float, ctypes.c_float]
        fn.restype = None
        return lib
    return False


def _torch_passes(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, wd: float, momentum: float,
                  lr: float) -> None:
    """torch's own update of one parameter with a momentum buffer: torch.optim.sgd's functional
    `sgd`, single-tensor (as torch.optim.SGD runs on CPU), dampening 0, no Nesterov. The
    gradient is left as it was."""
    from torch.optim.sgd import sgd

    sgd([p], [g], [buf], foreach=False, weight_decay=wd, momentum=momentum, lr=lr, dampening=0.0,
        nesterov=False, maximize=False)


def _call(lib: ctypes.CDLL, p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, wd: float, momentum: float,
          lr: float) -> None:
    lib.mhpfl_sgd_momentum(p.data_ptr(), g.data_ptr(), buf.data_ptr(), p.numel(), int(wd != 0), wd, momentum, -lr)


def kernel(wd: float, momentum: float, lr: float) -> ctypes.CDLL | None:
    """The compiled step, if it reproduces torch's passes bit for bit for these hyperparameters
    on vectors of every length remainder and of magnitudes 1e-30 to 1e30; else None."""
    global _lib
    if _lib is None:
        _lib = _compile() if enabled() else False
    if _lib is False:
        return None
    key = (wd, momentum, lr)
    if key not in _checked:
        gen = torch.Generator().manual_seed(0)
        ok = True
        for n in CHECK_LENGTHS:
            scale = 10.0 ** torch.randint(-30, 31, (3, n), generator=gen).float()
            p, g, buf = torch.randn(3, n, generator=gen) * scale
            mine = [t.clone() for t in (p, g, buf)]
            _torch_passes(p, g, buf, wd, momentum, lr)
            _call(_lib, *mine, wd, momentum, lr)
            ok &= all(torch.equal(a, b) for a, b in zip((p, g, buf), mine))
        _checked[key] = ok
    return _lib if _checked[key] else None


def _same_dense_layout(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor) -> bool:
    """A CPU float32 parameter laid out densely (contiguous or channels-last), its gradient and
    buffer with its strides (but where a dim has size 1: conv1's weight on one input channel comes
    back from autograd with its gradient's stride there set otherwise), three separate storages:
    one flat loop over `numel` elements then pairs the same elements."""
    if p.device.type != "cpu" or p.dtype != torch.float32 or p.layout != torch.strided:
        return False
    if not (p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))):
        return False
    strides = [s for s, n in zip(p.stride(), p.shape) if n > 1]  # a size-1 dim's stride places nothing
    if any(t.device != p.device or t.dtype != p.dtype or t.layout != p.layout or t.shape != p.shape
           or [s for s, n in zip(t.stride(), t.shape) if n > 1] != strides for t in (g, buf)):
        return False
    return len({t.untyped_storage().data_ptr() for t in (p, g, buf)}) == 3


def prepare(triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], wd: float, momentum: float,
            lr: float) -> Callable[[], None] | None:
    """A function applying torch.optim.SGD's update to every (parameter, gradient, momentum
    buffer) of `triples`, one pass each; None where the kernel cannot take all of them (the
    caller then runs torch's passes). Nothing is changed until it is called."""
    if torch.get_num_threads() != 1 or not all(_same_dense_layout(*t) for t in triples):
        return None
    lib = kernel(wd, momentum, lr)
    if lib is None:
        return None

    def apply() -> None:
        for p, g, buf in triples:
            _call(lib, p, g, buf, wd, momentum, lr)

    return apply
