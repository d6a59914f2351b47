"""Many clients as one batched computation (`--batch-clients`; off by default, see below).

How the engine batches with no change to any method:
1. The participants' updates of a phase run as cooperative threads, one at a time and in client
   order, so a run stays as deterministic as one client at a time. `Client.fit` parks its
   thread and hands its `FitRun` to the engine.
2. When every participant is parked or done, the parked fits are grouped. Fits train together
   when their loss is the same function closing over the same things up to "this client's"
   modules, model and tensors, their clients have one module structure, and they train the
   same parameters with the same epochs, batch size and lr.
3. A group trains in lockstep. At each step the members whose batches have one shape run their
   forward and backward passes as one `torch.vmap` over their stacked parameters (and over the
   tensors their losses close over, written back after the step, so a loss that accumulates
   statistics still does). Each member's gradients go to its own parameters, and each clips
   and steps its own optimizer with its own state (`FitRun.update`), exactly as alone. Each
   member's data order is its own generator's, and its FLOPs are its own step's count.
4. What cannot be batched runs one client at a time, with the same code: a fit alone in its
   group, a step alone in its batch shape (an epoch's last, smaller batch), the first step of a
   (loss, parameters, batch shape) key (its FLOPs are measured as autograd runs it), modules
   with buffers, a loss that closes over anything else that differs per client, and a loss
   that vmap rejects (e.g. random ops).
Then every parked thread resumes, in client order, until it parks again or finishes.

A loss must not mutate Python objects shared by every client (a list it appends to, an
attribute of the method): batched, it runs once per step for all members. The methods here
mutate only tensors, which are handled.

Measured (docs/performance.md): on CPU the vmapped convolutions run slower than one client at
a time, so the engine's default is off; it is meant for GPUs, where it could not be measured.
"""
from __future__ import annotations

import dis
import threading
import types
from contextlib import ExitStack
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mhpfl.engine.context import Client, FitRun


class _Cancelled(Exception):
    """Raised in a parked client's thread when another participant's update failed."""


class _Task:
    """One participant's update, run in its own thread when the batcher says so."""

    def __init__(self, batcher: "Batcher", cid: int, fn: Callable[[], Any]):
        self.batcher, self.cid, self.fn = batcher, cid, fn
        self.go = threading.Semaphore(0)
        self.run: FitRun | None = None  # the fit this task is parked in
        self.done, self.result, self.error = False, None, None
        self.thread = threading.Thread(target=self._main, args=(torch.get_num_threads(),),
                                       name=f"mhpfl-client-{cid}", daemon=True)

    def _main(self, threads: int) -> None:
        torch.set_num_threads(threads)  # a thread's OpenMP team size is its own setting
        self.batcher._local.task = self
        self.go.acquire()
        try:
            if self.batcher._cancelled:
                raise _Cancelled
            self.result = self.fn()
        except BaseException as e:  # handed to the engine's thread, which re-raises it
            self.error = e
        finally:
            self.done = True
            self.batcher._back.release()


class Batcher:
    """Runs one phase's participant updates so that their `Client.fit` calls train together."""

    def __init__(self):
        self._local = threading.local()
        self._back = threading.Semaphore(0)
        self._cancelled = False
        self.unbatchable: set = set()  # group keys whose loss vmap rejected: one at a time from now
        self.batched_steps = 0  # steps computed together (summary.json: batched_steps)
        # step key -> which trainable parameters autograd left without a gradient (None: the
        # optimizer skips them) in the key's first step, run alone; vmapped grad gives zeros there
        self.no_grad: dict[tuple, tuple[bool, ...]] = {}

    def run(self, updates: Mapping[int, Callable[[], Any]], clients: Mapping[int, Client]) -> dict[int, Any]:
        """Each participant's update (`updates[cid]()`), their fits batched; the results by cid.
        The first failure (in client order) is raised once every thread has stopped."""
        self._cancelled = False
        tasks = [_Task(self, cid, fn) for cid, fn in updates.items()]
        for t in tasks:
            clients[t.cid].batcher = self
            t.thread.start()
        try:
            for t in tasks:
                self._resume(t)
            while not any(t.error for t in tasks):
                parked = [t for t in tasks if t.run is not None]
                if not parked:
                    break
                self.train_together([t.run for t in parked])
                for t in parked:
                    self._resume(t)
        finally:
            self._cancelled = True
            for t in tasks:
                if not t.done:
                    self._resume(t)  # it raises _Cancelled where it waits
            for t in tasks:
                t.thread.join()
                clients[t.cid].batcher = None
        errors = [t.error for t in tasks if t.error is not None and not isinstance(t.error, _Cancelled)]
        if errors:
            raise errors[0]
        return {t.cid: t.result for t in tasks}

    def _resume(self, task: _Task) -> None:
        task.go.release()
        self._back.acquire()  # until the task parks in a fit or finishes

    def park(self, run: FitRun) -> float:
        """Called by `Client.fit` in a participant's thread: wait until the engine has trained
        `run` (alone or with others); return its mean loss or raise its error."""
        task = self._local.task
        task.run = run
        self._back.release()
        task.go.acquire()
        task.run = None
        if self._cancelled:
            raise _Cancelled
        if run.error is not None:
            raise run.error
        return run.mean_loss()

    # ---- training parked fits --------------------------------------------------------------
    def train_together(self, runs: list[FitRun]) -> None:
        groups: dict[Any, list[FitRun]] = {}
        for r in runs:
            key = group_key(r)
            groups.setdefault(key if key is not None else ("alone", id(r)), []).append(r)
        for key, members in groups.items():
            self._lockstep(None if key[0] == "alone" else key, members)

    def _lockstep(self, key: Any, members: list[FitRun]) -> None:
        """Train `members` step by step; steps of one batch shape are computed together."""
        with ExitStack() as stack:
            for r in members:
                stack.enter_context(r.trainable())
            live = {r: r.batches() for r in members}
            together = None
            if key is not None and len(members) > 1 and key not in self.unbatchable:
                try:
                    together = _Together(members)
                except Exception:  # a layout the batched step cannot map: one at a time
                    self.unbatchable.add(key)
            while live:
                shapes: dict[tuple, list[tuple[FitRun, torch.Tensor, torch.Tensor]]] = {}
                for r, it in list(live.items()):
                    try:
                        x, y = next(it)
                    except StopIteration:
                        del live[r]
                        continue
                    except Exception as e:  # NonFiniteLoss at the end of an epoch
                        r.error = e
                        del live[r]
                        continue
                    shapes.setdefault((x.shape, x.dtype, y.shape, y.dtype), []).append((r, x, y))
                for batch in shapes.values():
                    if not (together is not None and key not in self.unbatchable and len(batch) > 1
                            and all(r.step_key(x) in self.no_grad for r, x, _ in batch)
                            and self._step_together(key, together, batch)):
                        for r, x, y in batch:
                            try:
                                r.backward(x, y)
                            except Exception as e:
                                r.error = e
                                del live[r]
                                continue
                            self.no_grad[r.step_key(x)] = tuple(p.grad is None for p in r.params)
                    for r, _, _ in batch:
                        if r.error is None:
                            r.update()

    def _step_together(self, key: Any, together: "_Together", batch: list) -> bool:
        try:
            together.step(batch, self.no_grad)
        except Exception:  # e.g. vmap rejects the loss: this group trains one at a time from now
            self.unbatchable.add(key)
            return False
        self.batched_steps += 1
        return True


class _Ref(nn.Module):
    """The first member's modules, called with another member's parameters (functional_call)."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fn(x, y)


class _Together:
    """A group's batched step: client i's loss is the first member's loss function with client
    i's parameters and tensors in its place, vmapped over i."""

    def __init__(self, members: list[FitRun]):
        r0 = members[0]
        self.fn, self.ref = r0.loss_fn, _Ref(r0.client.modules)
        index = {id(p): i for i, p in enumerate(_unique_params(r0.client))}
        self.names: dict[int, list[str]] = {}
        for name, p in self.ref.named_parameters(remove_duplicate=False):
            self.names.setdefault(index[id(p)], []).append(name)
        self.train_idx = [index[id(p)] for p in r0.params]
        self.frozen_idx = [i for i in self.names if i not in set(self.train_idx)]
        self.params = {id(r): _unique_params(r.client) for r in members}
        self.kinds = [_cell_kind(r0, name, c.cell_contents) for name, c in
                      zip(self.fn.__code__.co_freevars, self.fn.__closure__ or ())]
        self.frozen: dict[tuple, dict[str, torch.Tensor]] = {}  # stacked once per set of members

    def step(self, batch: list[tuple[FitRun, torch.Tensor, torch.Tensor]], no_grad: dict) -> None:
        runs = [r for r, _, _ in batch]
        ids = tuple(id(r) for r in runs)
        def stacked(i: int) -> torch.Tensor:  # contiguous: stacked channels-last kernels run slower
            return torch.stack([self.params[id(r)][i].detach() for r in runs]).contiguous()

        train = {str(i): stacked(i) for i in self.train_idx}
        if ids not in self.frozen:
            self.frozen[ids] = {str(i): stacked(i) for i in self.frozen_idx}
        cells = [[c.cell_contents for c in r.loss_fn.__closure__ or ()] for r in runs]
        tensors = {j: torch.stack([cs[j] for cs in cells]) for j, k in enumerate(self.kinds) if k[0] == "tensor"}
        for j in tensors:
            if len({id(cs[j]) for cs in cells}) != len(runs):
                raise ValueError("a tensor the loss closes over is shared by clients")
        x = torch.stack([x for _, x, _ in batch])
        y = torch.stack([y for _, _, y in batch])
        r0 = runs[0]
        with r0.client.meter.quiet(), r0.client.autocast():
            grads, losses = torch.vmap(torch.func.grad_and_value(self._loss))(train, self.frozen[ids], tensors, x, y)
        for j, stacked in tensors.items():  # what the loss accumulated into its tensors
            for cs, t in zip(cells, stacked):
                cs[j].copy_(t)
        for i, (r, x_i, _) in enumerate(batch):
            r.set_grads(x_i, losses[i], [None if none else grads[str(k)][i]
                                         for k, none in zip(self.train_idx, no_grad[r.step_key(x_i)])])

    def _loss(self, train: dict, frozen: dict, tensors: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = {n: t for i, t in (*train.items(), *frozen.items()) for n in self.names[int(i)]}
        cells = []
        for j, k in enumerate(self.kinds):
            kind = k[0]
            v = (tensors[j] if kind == "tensor" else self.ref.mods[k[1]].get_submodule(k[2]) if kind == "module"
                 else self.fn.__closure__[j].cell_contents)  # "client" (the first member) or shared
            cells.append(types.CellType(v))
        f = self.fn
        fn = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, tuple(cells))
        return torch.func.functional_call(self.ref, values, (fn, x, y))


def _unique_params(client: Client) -> list[nn.Parameter]:
    return list(dict.fromkeys(p for m in client.modules for p in m.parameters()))


def _cell_kind(run: FitRun, name: str, v: Any) -> tuple | None:
    """How a value the loss closes over is handled in a batched step (None: it cannot be)."""
    if isinstance(v, nn.Module):
        for mi, m in enumerate(run.client.modules):
            for path, sub in m.named_modules():
                if sub is v:
                    return ("module", mi, path)
        return None
    if v is run.client:  # allowed only as `client.model` (the first member's model is substituted)
        uses = list(dis.get_instructions(run.loss_fn.__code__))
        ok = all(b.opname in ("LOAD_ATTR", "LOAD_METHOD") and b.argval == "model"
                 for a, b in zip(uses, uses[1:]) if a.opname == "LOAD_DEREF" and a.argval == name)
        closure_uses = any(i.opname == "LOAD_CLOSURE" and i.argval == name for i in uses)
        return ("client",) if ok and not closure_uses and run.client.model is run.client.modules[0] else None
    if torch.is_tensor(v):
        if isinstance(v, nn.Parameter) or v.requires_grad:
            return None
        return ("tensor", tuple(v.shape), v.dtype, v.device)
    if v is None or isinstance(v, (bool, int, float, str)):
        return ("value", type(v), v)
    return ("same", id(v))  # e.g. the method object: batches only with clients closing over it too


def group_key(run: FitRun) -> tuple | None:
    """What fits must share to train as one computation; None when `run` cannot be batched."""
    fn, client = run.loss_fn, run.client
    if not isinstance(fn, types.FunctionType) or fn.__kwdefaults__:
        return None
    if any(True for m in client.modules for _ in m.buffers()):
        return None
    try:
        kinds = tuple(_cell_kind(run, n, c.cell_contents) for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    except ValueError:  # an empty cell
        return None
    if None in kinds or any(not isinstance(d, (bool, int, float, str, type(None))) for d in fn.__defaults__ or ()):
        return None
    index = {id(p): i for i, p in enumerate(_unique_params(client))}
    structure = tuple((type(m), tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters(remove_duplicate=False)))
                      for m in client.modules)
    return (fn.__code__, id(fn.__globals__), fn.__defaults__, structure, tuple(index[id(p)] for p in run.params),
            kinds, run.epochs, run.batch_size, run.lr, id(client.cfg))
