"""What the engine hands a method: a client's context and the server's context.

The training helper `Client.fit` is the one training loop of the suite: it builds the
optimizer (SGD with the run's lr, momentum and weight decay), freezes everything on the client
that is not being trained, clips gradients, stops on a non-finite loss (checked once per epoch:
no host sync per step), autocasts to the run's --precision and charges every step's FLOPs
(forward and the backward autograd really runs) to the meter. Its steps are `FitRun`'s, which
the batched engine (--batch-clients) drives for many clients at once. Evaluation goes through
`Client.correct` / `Client.correct_heads` (inference mode, INFER_BATCH, one sync). Methods
describe *what* to train and *with which loss*; never how to loop.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from mhpfl.config import RunConfig
from mhpfl.datasets import INFER_BATCH, ClientData, DatasetInfo, Split
from mhpfl.engine.meter import FlopMeter
from mhpfl.errors import NonFiniteLoss, UserError
from mhpfl.lean import SGD, clip_grad_norm
from mhpfl.messages import Message, Upload
from mhpfl.models import build_model
from mhpfl.seeding import np_rng, seed_torch, torch_gen

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Client:
    """One federated client: its private model, data and state, and the shared helpers."""

    def __init__(self, cid: int, arch: str, data: ClientData, public: Split, info: DatasetInfo,
                 cfg: RunConfig, meter: FlopMeter, method_name: str):
        self.cid, self.arch, self.data, self.public, self.info = cid, arch, data, public, info
        self.cfg, self.meter, self.method_name = cfg, meter, method_name
        self.round = 0
        self.ready = False  # set up by the method (init_client runs at the first participation)
        self.state: dict[str, Any] = {}  # what the method keeps on this client between rounds
        self.modules: list[nn.Module] = []
        self.gen = torch_gen(cfg.seed, "client", cid, "init", device=cfg.device)
        self.batcher: Any = None  # set by the engine while it trains clients together
        self.model = self.new_model(arch)

    # ---- models ------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(self.data.train)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def new_model(self, arch: str, tag: str = "model") -> nn.Module:
        """A fresh zoo model on this client, seeded by (seed, client, tag) and metered."""
        seed_torch(self.cfg.seed, "init", self.cid, tag, arch)
        model = build_model(arch, self.info.in_shape, self.info.num_classes).to(self.cfg.device)
        return self.track(model, label=arch)

    def track(self, module: nn.Module, in_shape: tuple[int, ...] | None = None,
              label: str | None = None) -> nn.Module:
        """Meter `module`'s FLOPs; call again after changing its structure (e.g. adapters)."""
        module.to(self.cfg.device)
        self.meter.track(module, in_shape or self.info.in_shape, label or type(module).__name__)
        if all(m is not module for m in self.modules):
            self.modules.append(module)
        return module

    # ---- training ----------------------------------------------------------------------
    def start_update(self, round_: int, phase: str) -> None:
        """Called by the engine before each client update: a fresh, order-independent stream, on
        the run's device (data order and augmentation draw there: no host-to-device copy per step,
        which on a GPU waits for the queue)."""
        self.round = round_
        self.gen = torch_gen(self.cfg.seed, "client", self.cid, round_, phase, device=self.cfg.device)

    def fit(self, params: Iterable[nn.Parameter], loss_fn: LossFn, *, epochs: int | None = None,
            data: Split | None = None, batch_size: int | None = None, lr: float | None = None) -> float:
        """Train exactly `params` (everything else on the client is frozen) for `epochs` passes
        over `data` (default: the client's training set), minimising loss_fn(x, y) with SGD.
        Returns the mean batch loss. Under --batch-clients the engine may run this fit's steps
        together with other clients' (engine/batching.py): the same steps, the same result."""
        run = FitRun(self, params, loss_fn, epochs=epochs, data=data, batch_size=batch_size, lr=lr)
        if self.batcher is not None:
            return self.batcher.park(run)
        with run.trainable():
            for x, y in run.batches():
                run.backward(x, y)
                run.update()
        return run.mean_loss()

    def _check_finite(self, losses: list[torch.Tensor]) -> None:
        """Stop on a non-finite loss. Checked once per epoch (one device sync, not one per step:
        on a GPU a per-step `float(loss)` stalls the queue); reports the first bad value."""
        if not losses:
            return
        stacked = torch.stack(losses)
        bad = ~torch.isfinite(stacked)
        if bool(bad.any()):
            raise NonFiniteLoss(self.method_name, self.cid, self.round, float(stacked[bad][0]))

    def autocast(self):
        """The run's `--precision`: bf16 autocast of forward passes (fp32 master weights), or
        nothing (fp32, the default)."""
        dev = torch.device(self.cfg.device).type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    @torch.no_grad()
    def infer(self, fn: Callable[[torch.Tensor], torch.Tensor], data: Split,
              batch_size: int = INFER_BATCH) -> torch.Tensor:
        """Run fn over `data` in order without gradients, charged to this client (e.g. scores
        on public data to upload); returns the concatenated outputs (float32)."""
        for m in self.modules:
            m.eval()
        with self.meter.count(), self.autocast():
            return torch.cat([fn(x).float() for x, _ in data.batches(batch_size, shuffle=False)])

    @contextmanager
    def evaluating(self):
        """Inference context for evaluation: every module in eval mode, torch.inference_mode
        (no autograd bookkeeping at all; outputs must not flow into training) and the run's
        precision. Not metered: evaluation is not client training compute."""
        for m in self.modules:
            m.eval()
        with torch.inference_mode(), self.autocast():
            yield

    def correct(self, predict: Callable[[torch.Tensor], torch.Tensor], split: Split,
                batch_size: int = INFER_BATCH) -> int:
        """How many samples of `split` predict(x)'s argmax gets right, in `evaluating()`, batches
        of INFER_BATCH in order, the count kept on the device (one sync at the end)."""
        return self.correct_heads(lambda x: {"": predict(x)}, split, ("",), batch_size)[""]

    def correct_heads(self, predict: Callable[[torch.Tensor], dict[str, torch.Tensor]], split: Split,
                      heads: Sequence[str], batch_size: int = INFER_BATCH) -> dict[str, int]:
        """`correct` for several heads in one pass over the data: predict(x) maps each head to
        its scores."""
        hits: dict[str, Any] = dict.fromkeys(heads, 0)
        with self.evaluating():
            for x, y in split.batches(batch_size, shuffle=False):
                scores = predict(x)
                if missing := [h for h in heads if h not in scores]:
                    raise UserError(f"{self.method_name}: predict_heads returned no scores for eval "
                                    f"head(s) {', '.join(missing)}; return one tensor for every head "
                                    f"in eval_heads ({', '.join(heads)})")
                for h in heads:
                    hits[h] = hits[h] + (scores[h].argmax(1) == y).sum()
            return {h: int(v) for h, v in hits.items()}


class FitRun:
    """One `Client.fit` call as a sequence of SGD steps: the optimizer (SGD with the run's lr,
    momentum and weight decay), the client's data order, the non-finite check once per epoch,
    the FLOP charge of every step, per-client gradient clipping. `Client.fit` drives it one
    step at a time; the batched engine drives many clients' runs in lockstep and computes
    their gradients as one computation (`set_grads`), everything else unchanged."""

    def __init__(self, client: Client, params: Iterable[nn.Parameter], loss_fn: LossFn, *,
                 epochs: int | None, data: Split | None, batch_size: int | None, lr: float | None):
        self.client, self.loss_fn = client, loss_fn
        self.params = list(dict.fromkeys(params))
        if any(id(p) not in client.meter.tracked_params for p in self.params):
            raise RuntimeError(f"{client.method_name} trains parameters of a module it did not "
                               "register with client.track(); its FLOPs would go uncounted")
        cfg = client.cfg
        self.data = client.data.train if data is None else data
        self.epochs = cfg.local_epochs if epochs is None else epochs
        self.batch_size = batch_size or cfg.batch_size
        self.lr = cfg.lr if lr is None else lr
        self.opt = SGD(self.params, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.losses: list[torch.Tensor] = []
        self.epoch: list[torch.Tensor] = []
        self.error: BaseException | None = None  # set by the batched engine for `park` to raise
        # FLOPs: one step per (loss, trainable parameters, batch shape) is measured as autograd runs it
        self.key = (getattr(loss_fn, "__code__", type(loss_fn)), tuple((id(p), p.shape) for p in self.params))

    @contextmanager
    def trainable(self):
        """Every module of the client in training mode, only `params` requiring gradients."""
        for m in self.client.modules:
            m.train()
        ids = {id(p) for p in self.params}
        every = [p for m in self.client.modules for p in m.parameters()] + self.params
        saved = [(p, p.requires_grad) for p in every]
        for p in every:
            p.requires_grad_(id(p) in ids)
        try:
            yield
        finally:
            for p, rg in saved:
                p.requires_grad_(rg)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The run's batches, epoch after epoch, in the client's order; the losses of an epoch
        are checked when it ends (raises NonFiniteLoss)."""
        for _ in range(self.epochs):
            for x, y in self.data.batches(self.batch_size, self.client.gen):
                yield x, y
            self.client._check_finite(self.epoch)
            self.losses += self.epoch
            self.epoch = []

    def step_key(self, x: torch.Tensor) -> tuple:
        return (*self.key, tuple(x.shape))

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """This client's forward and backward pass on one batch, metered."""
        with self.client.meter.step(self.step_key(x)):
            with self.client.autocast():
                loss = self.loss_fn(x, y)
            self.epoch.append(loss.detach().float())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()

    def set_grads(self, x: torch.Tensor, loss: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> None:
        """The batched engine's replacement for `backward`: this client's loss and gradients
        (None where autograd gives none), computed together with other clients'; charged the
        FLOPs its own step measured."""
        self.client.meter.charge(self.step_key(x))
        self.epoch.append(loss.detach().float())
        for p, g in zip(self.params, grads):
            p.grad = g

    def update(self) -> None:
        """Clip this client's gradients (its own norm) and take its optimizer's step."""
        if self.client.cfg.grad_clip:
            clip_grad_norm(self.params, self.client.cfg.grad_clip)
        self.opt.step()

    def mean_loss(self) -> float:
        return float(torch.stack(self.losses).double().mean()) if self.losses else 0.0


class Server:
    """The server's context: its state, a seeded random stream, and what it may know."""

    def __init__(self, cfg: RunConfig, info: DatasetInfo, public_size: int):
        self.cfg, self.info, self.public_size = cfg, info, public_size
        self.round = 0
        self.state: dict[str, Any] = {}
        self.rng = np_rng(cfg.seed, "server")

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def start_round(self, round_: int) -> None:
        self.round = round_
        self.rng = np_rng(self.cfg.seed, "server", round_)

    def track(self, module: nn.Module) -> nn.Module:
        """Declare a module the server trains or runs (FedTGP's prototype generator, FedGH's header),
        on the run's device. Not metered (server compute is not client compute), but work the method
        does by design: the benchmark's floor replays its passes (benchmarks/floor.py)."""
        return module.to(self.cfg.device)

    def new_model(self, arch: str, tag: str = "global") -> nn.Module:
        """A zoo model built on the server (not metered: server compute is not client compute)."""
        seed_torch(self.cfg.seed, "init", "server", tag, arch)
        return build_model(arch, self.info.in_shape, self.info.num_classes).to(self.cfg.device)
