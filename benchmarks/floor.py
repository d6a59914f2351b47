"""The floor of a round: exactly the passes an engine round ran, replayed with no framework.

`Tracer` records every forward pass of every module a client registered with `client.track`
during one round of a real run (a round after the clients' set-up): input batch shape, whether it
trains, and which parameters are trainable. So the floor does exactly that round's work: the same
models, the same number of SGD steps at the same batch sizes, the same inference passes (public scores,
validation and test evaluation) and any extra work a method does by design (FedMD's public
passes, FedKD's mentee). It also records the passes of every module the server declared with
`server.track` (FedTGP's prototype generator and FedGH's header, trained on the server each round:
work by design, though not client work, so not metered and not in the floor's FLOPs).
`replay` runs those passes as a bare PyTorch loop: a training pass is
forward + a scalar loss + backward + gradient clipping + an SGD step on the recorded trainable
parameters; an inference pass is a forward pass in inference mode. Inputs are random tensors of
the recorded shapes, gathered by a random index for training batches as the engine does; an
integer input (the class ids FedTGP's generator embeds) is replayed as recorded. The server's
training passes replay as the clients' do, with the run's SGD and clipping (FedTGP's server steps
use no momentum and no clipping: a few tensor operations a step more in the floor).
Each pass's FLOPs are counted by torch's FlopCounterMode on the floor's own replay (`Floor._count`):
a training pass's backward is what autograd runs for its trainable parameters, not a nominal
2x forward.
The tracer also records every truncated SVD the round runs (`lowrank.truncated_svd`: FedKD
compresses each upload and each aggregate: work by design, not a forward pass), with its
arguments, and the floor runs the same decompositions of the same matrices
(`replay_decompositions`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from mhpfl.engine.context import Server
from mhpfl.engine.meter import FlopMeter
from mhpfl.lean import SGD, clip_grad_norm, total_flop_counter
from mhpfl.methods import lowrank


@dataclass
class Pass:
    module: nn.Module
    shape: tuple[int, ...]  # input batch shape
    train: bool
    trainable: tuple[nn.Parameter, ...]
    flops: int = 0  # multiply-adds of the pass as the floor runs it (`Floor._count`; 0 on the server)
    server: bool = False  # a pass of a module the server declared (`server.track`)
    data: torch.Tensor | None = None  # an integer input, replayed as recorded


class Tracer:
    """Patches FlopMeter.track (clients) and Server.track so every tracked module also reports its
    forward passes here."""

    def __init__(self):
        self.passes: list[Pass] = []
        self.decompositions: list[tuple] = []  # lowrank.truncated_svd's arguments
        self.recording = False
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._orig = FlopMeter.track
        self._server_track = Server.track
        self._svd = lowrank.truncated_svd

    def __enter__(self) -> "Tracer":
        tracer, orig, server_track, svd = self, self._orig, self._server_track, self._svd

        def traced_svd(m, energy, max_rank):
            if tracer.recording:
                tracer.decompositions.append((m.detach().clone(), energy, max_rank))
            return svd(m, energy, max_rank)

        def watch(module, server):
            def hook(mod, args, output):
                if tracer.recording and args and torch.is_tensor(args[0]):
                    x, grad = args[0], torch.is_grad_enabled()
                    trainable = tuple(p for p in mod.parameters() if p.requires_grad) if grad else ()
                    tracer.passes.append(Pass(mod, tuple(x.shape), grad, trainable, server=server,
                                              data=None if x.is_floating_point() else x.detach().clone()))

            old = tracer._handles.pop(id(module), None)
            if old is not None:
                old.remove()
            tracer._handles[id(module)] = module.register_forward_hook(hook)

        def track(meter, module, in_shape, label):
            out = orig(meter, module, in_shape, label)
            watch(module, server=False)
            return out

        def track_server(server, module):
            out = server_track(server, module)
            watch(module, server=True)
            return out

        FlopMeter.track = track
        Server.track = track_server
        lowrank.truncated_svd = traced_svd
        return self

    def __exit__(self, *exc) -> None:
        FlopMeter.track = self._orig
        Server.track = self._server_track
        lowrank.truncated_svd = self._svd
        for h in self._handles.values():
            h.remove()
        self._handles.clear()


class Floor:
    """The recorded passes, ready to replay (inputs and optimizers built outside the timing)."""

    def __init__(self, passes: list[Pass], lr: float, momentum: float, weight_decay: float,
                 grad_clip: float, device: str = "cpu", seed: int = 0,
                 decompositions: list[tuple] = ()):
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        self.decompositions = list(decompositions)
        self.passes = _on_copies(passes)  # the replay must not move the run's own models
        passes = self.passes
        g = torch.Generator().manual_seed(seed)
        biggest: dict[tuple, int] = {}
        for p in passes:
            if p.data is None:
                biggest[p.shape[1:]] = max(biggest.get(p.shape[1:], 0), p.shape[0])
        self.pools = {s: torch.randn(2 * n, *s, generator=g).to(device).contiguous(
            memory_format=torch.channels_last if len(s) == 3 else torch.contiguous_format)
            for s, n in biggest.items()}
        self.index = [torch.randperm(len(self.pools[p.shape[1:]]), generator=g)[:p.shape[0]].to(device)
                      if p.train and p.data is None else None for p in passes]
        self.opts: dict[tuple, torch.optim.Optimizer] = {}
        for p in passes:
            key = tuple(id(q) for q in p.trainable)
            if p.train and key and key not in self.opts:
                # the engine's optimizer (torch's update, bit for bit; torch.optim.SGD's step would
                # import torch._dynamo and make copies lean.SGD does not)
                self.opts[key] = SGD(p.trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._count()

    @property
    def flops(self) -> int:
        """The clients' multiply-adds (what the engine meters; the server's passes count 0)."""
        return sum(p.flops for p in self.passes)

    @property
    def steps(self) -> int:
        return sum(p.train and not p.server for p in self.passes)

    @property
    def server_steps(self) -> int:
        return sum(p.train and p.server for p in self.passes)

    def replay(self, kind: str | None = None) -> float:
        """Run the round's passes once: all, or one kind ("train": the clients' training passes,
        "eval": their inference passes, "server": the server's passes); returns the seconds taken
        (to the device's completion)."""
        self._sync()
        t0 = time.perf_counter()
        for p, idx in zip(self.passes, self.index):
            if kind is None or kind == ("server" if p.server else "train" if p.train else "eval"):
                self._run(p, idx)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        """Wait for the device's queue (CUDA runs asynchronously: a replay is timed to its end)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, p: Pass, idx, step: bool = True) -> None:
        """One pass: a training pass is forward, a scalar loss, backward, gradient clipping and an
        SGD step (`step` False: forward and backward only); an inference pass is a forward pass."""
        x = p.data if p.data is not None else self.pools[p.shape[1:]][idx if p.train else slice(p.shape[0])]
        if not p.train:
            p.module.eval()
            with torch.inference_mode():
                p.module.forward(x)
            return
        ids = {id(q) for q in p.trainable}
        for q in p.module.parameters():
            q.requires_grad_(id(q) in ids)
        p.module.train()
        out = p.module.forward(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = out.float().logsumexp(1).mean()  # a scalar that every output feeds
        opt = self.opts.get(tuple(id(q) for q in p.trainable))
        if opt is None:  # nothing of this module trains (another module's loss uses its output)
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step:
            if self.grad_clip:
                clip_grad_norm(p.trainable, self.grad_clip)
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)

    def _count(self) -> None:
        """Each pass's FLOPs as torch's FlopCounterMode counts the floor's own work, in
        multiply-adds: the forward pass, and for a training pass the backward pass as autograd runs
        it, which computes only what the trainable parameters need. With the model frozen and
        LoRA on its last layer (pFedLoRA's adapter phase) that is about one forward pass, not the
        three of a fully trained one; the first layer's input gradient is never computed either.
        One count per distinct pass (module, batch shape, kind, trainable parameters), outside
        the timing; no SGD step is taken. The server's passes are not client work: not counted."""
        counted: dict[tuple, int] = {}
        for p, idx in zip(self.passes, self.index):
            if p.server:
                continue
            key = (id(p.module), p.shape, p.train, tuple(id(q) for q in p.trainable))
            if key not in counted:
                with total_flop_counter() as fc:
                    self._run(p, idx, step=False)
                counted[key] = fc.get_total_flops() // 2
            p.flops = counted[key]

    def replay_decompositions(self) -> float:
        """Run the round's truncated SVDs once, on the matrices the round decomposed; returns the
        seconds."""
        self._sync()
        t0 = time.perf_counter()
        for args in self.decompositions:
            lowrank.truncated_svd(*args)
        self._sync()
        return time.perf_counter() - t0


def _on_copies(passes: list[Pass]) -> list[Pass]:
    """The same passes on deep copies of their modules (trainable parameters mapped)."""
    clones: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}
    for p in passes:
        if id(p.module) not in clones:
            clone = copy.deepcopy(p.module)
            clones[id(p.module)] = clone
            params.update({id(a): b for a, b in zip(p.module.parameters(), clone.parameters())})
    return [Pass(clones[id(p.module)], p.shape, p.train, tuple(params[id(q)] for q in p.trainable), p.flops,
                 p.server, p.data) for p in passes]


def peak_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """The core's measured fp32 rate: FLOP/s (2 per multiply-add) of an n x n matmul, the best of
    as many as run in `seconds` (at least 5): a core that has just woken up, or a moment of load
    from elsewhere, reads low over a few calls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end, calls = float("inf"), time.perf_counter() + seconds, 0
    while calls < 5 or time.perf_counter() < end:
        best, calls = min(best, _timed(lambda: torch.mm(a, b))), calls + 1
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
