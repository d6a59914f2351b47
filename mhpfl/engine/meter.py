"""Meters: bytes of what is actually sent, FLOPs of what is actually run.

Bytes: the sum of numel x element_size over the tensors placed in a message.

FLOPs: fvcore counts each registered module's forward FLOPs for one sample once (fvcore counts
one multiply-add as one FLOP; torch.utils.flop_counter counts it as two). A forward hook then
adds per-sample FLOPs x batch size for every forward pass a client runs; a forward run with
autograd enabled is assumed to be backpropagated and is charged 3x (forward + backward counted
as 2x forward, the usual convention). That charges a frozen model's backward pass in full, so a
method that trains only an adapter is, if anything, over-charged.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from mhpfl.messages import message_bytes  # noqa: F401  (re-exported)


def forward_flops(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """fvcore's forward FLOPs of `module` on one sample of shape `in_shape`."""
    with warnings.catch_warnings():  # fvcore's import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    p = next(module.parameters(), None)
    x = torch.zeros(1, *in_shape, device=p.device if p is not None else "cpu")
    was_training = module.training
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, x)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = int(fca.total())
    module.train(was_training)
    return total


class FlopMeter:
    """Charges the FLOPs of tracked modules' forward (and backward) passes while counting."""

    def __init__(self):
        self.total = 0
        self.counting = False
        self.per_sample: dict[str, int] = {}  # label -> forward FLOPs per sample
        self._cache: dict[tuple, int] = {}
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self.tracked_params: set[int] = set()

    def track(self, module: nn.Module, in_shape: tuple[int, ...], label: str) -> nn.Module:
        """Measure `module` (again, if it changed) and charge its forward passes from now on."""
        sig = (type(module).__qualname__, tuple(in_shape),
               tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))
        if sig not in self._cache:
            self._cache[sig] = forward_flops(module, in_shape)
        flops = self._cache[sig]
        self.per_sample[label] = flops
        old = self._hooks.pop(id(module), None)
        if old is not None:
            old.remove()

        def hook(mod, args, output):
            if self.counting:
                n = args[0].shape[0] if args and torch.is_tensor(args[0]) else 1
                self.total += flops * n * (3 if torch.is_grad_enabled() else 1)

        self._hooks[id(module)] = module.register_forward_hook(hook)
        self.tracked_params.update(id(p) for p in module.parameters())
        return module

    @contextmanager
    def count(self):
        prev, self.counting = self.counting, True
        try:
            yield
        finally:
            self.counting = prev
