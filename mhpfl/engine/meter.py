"""Meters: bytes of what is actually sent, FLOPs of what is actually run.

Bytes: the sum of numel x element_size over the tensors placed in a message.

FLOPs, with one convention throughout: a multiply-add is 1 FLOP (fvcore's; torch's
FlopCounterMode counts 2, so its counts are halved here).
- Training (`FlopMeter.step`, used by `Client.fit` for every SGD step): the first step of each
  (loss function, trainable parameters, batch shape) runs under torch.utils.flop_counter's
  FlopCounterMode (`mhpfl.lean.total_flop_counter`: its total only, without the per-module
  breakdown), which sees the forward ops and the backward ops autograd really executes (a
  frozen layer's weight gradient is not computed, so it costs nothing; the first layer's input
  gradient neither); later steps with the same key are charged the same count.
- Inference (`FlopMeter.count`, used by `Client.infer`): fvcore's forward FLOPs of each tracked
  module for one sample, x batch size, per forward pass. `per_sample` holds these figures, which
  the tables show; a test checks that FlopCounterMode and fvcore agree on forward passes.
Evaluation is not client training work and is not charged; server compute is not metered.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from mhpfl.lean import fvcore_flop_count, total_flop_counter
from mhpfl.messages import message_bytes  # noqa: F401  (re-exported)


def forward_flops(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """fvcore's forward FLOPs of `module` on one sample of shape `in_shape`."""
    with warnings.catch_warnings():  # fvcore's import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        FlopCountAnalysis = fvcore_flop_count().FlopCountAnalysis

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
        self.step_flops: dict[tuple, int] = {}  # training-step key -> FLOPs of one step

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
                self.total += flops * n

        self._hooks[id(module)] = module.register_forward_hook(hook)
        self.tracked_params.update(id(p) for p in module.parameters())
        return module

    @contextmanager
    def counting_inference(self, on: bool):
        """Inference passes of tracked modules are charged inside (on) or not (off)."""
        prev, self.counting = self.counting, on
        try:
            yield
        finally:
            self.counting = prev

    def count(self):
        return self.counting_inference(True)

    def quiet(self):
        """No inference charges inside (the batched engine's passes are charged per client)."""
        return self.counting_inference(False)

    @contextmanager
    def step(self, key: tuple):
        """Charge one training step (the forward and backward passes run inside the block): the
        first step of a key is measured with FlopCounterMode, later ones reuse the count."""
        with self.quiet():  # the inference hooks stay silent in a step
            if key in self.step_flops:
                yield
            else:
                with total_flop_counter() as fc:
                    yield
                self.step_flops[key] = fc.get_total_flops() // 2
            self.total += self.step_flops[key]

    def charge(self, key: tuple) -> None:
        """Charge one training step of an already measured key whose passes ran elsewhere (the
        batched engine computes many clients' steps at once: each is charged its own count)."""
        self.total += self.step_flops[key]
