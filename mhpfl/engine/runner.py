"""The round loop: sample participants, exchange messages phase by phase, meter, evaluate.

Every engine (this in-process one, Flower) is built from the same three pieces: `client_step`
(what a client does with one message), `evaluate_client` (what a client reports at an
evaluation) and `Recorder` (how the per-round numbers become rounds.csv and summary.json).

The evaluation protocol, i.e. what every accuracy figure means (tests/test_protocol.py pins each):
- At round 0 (before training), every --eval-every rounds and at the last round, EVERY client is
  evaluated on its validation split and on its test split (both partitioned with the client's
  class shares; a client that has not taken part in a round since its last evaluation is
  unchanged, and every engine reuses that evaluation: `EvalCache`). With --test-eval improved
  the test split is evaluated only at the last round and at the rounds >= 1 where some head's
  mean validation accuracy beats its best so far: the rounds the selection below can pick, so
  the selected and final accuracies are exactly those of `every`; the other rows of
  rounds.csv have no test columns and `best_mean_acc` is null. A client that has not
  participated yet has not run the method's set-up (a real federation's client starts when it
  is first contacted): it is evaluated with its untouched model, and counted as
  never-participated.
- Per round: the unweighted mean over clients (the paper's), the sample-weighted accuracy
  sum(correct) / sum(n) over clients (HtFLlib's), min / max / std over clients, and the mean
  over the clients that have participated at least once.
- The accuracy of a run, `selected_mean_acc`, is the mean test accuracy at the evaluated round
  (>= 1) with the best mean *validation* accuracy (the earliest on ties). `best_mean_acc` (the
  best mean test accuracy over rounds >= 1: what the paper's tables report, optimistic since
  it selects on test) and `final_mean_acc` (the last round) are kept as further columns.
- A run has converged when the best mean validation accuracy of its last 20% of rounds
  improves the best of the earlier evaluated rounds by less than CONVERGENCE_POINTS.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from mhpfl.config import RunConfig, library_versions
from mhpfl.datasets import PartitionSpec, federate
from mhpfl.engine.batching import Batcher
from mhpfl.engine.context import Client, Server
from mhpfl.engine.meter import FlopMeter
from mhpfl.errors import UserError
from mhpfl.io import atomic_write_json, atomic_write_text
from mhpfl.lean import lean_startup
from mhpfl.messages import Message, Upload, message_bytes
from mhpfl.methods import Method, get_method
from mhpfl.models import zoo_archs
from mhpfl.results import SELECTED_FINAL_ROUND, SELECTED_ON_VALIDATION
from mhpfl.seeding import np_rng, seed_torch

TIMING_FIELDS = ("wall_seconds",)
SPLITS = ("val", "test")
CONVERGENCE_POINTS = 0.5  # gain of the last 20% of rounds' best validation mean that still counts as converged
CONVERGENCE_TAIL = 0.2
ROUND_COLUMNS = ["round", "mean_acc", "weighted_acc", "mean_val_acc", "weighted_val_acc",
                 "mean_acc_participated", "participated", "min_acc", "max_acc", "std_acc",
                 "bytes_up", "bytes_down", "train_flops", "cum_bytes_up", "cum_bytes_down",
                 "cum_train_flops", "wall_seconds"]


def wire(message: Any, method: str, direction: str) -> dict[str, torch.Tensor]:
    """What crosses the network: detached copies of the message's tensors (no aliasing)."""
    if not isinstance(message, Mapping):
        raise UserError(f"{method}: its {direction} message must be a mapping of tensors, "
                        f"got {type(message).__name__}; fix the method")
    out = {}
    for k, v in message.items():
        if not (isinstance(k, str) and torch.is_tensor(v)):
            raise UserError(f"{method}: its {direction} message holds {k!r}: {type(v).__name__}; "
                            "messages carry only str -> torch.Tensor; fix the method")
        out[k] = v.detach().clone()
    return out


def participants(cfg: RunConfig, round_: int) -> list[int]:
    m = cfg.per_round
    return sorted(np_rng(cfg.seed, "sample", round_).choice(cfg.clients, m, replace=False).tolist())


# ---- a client's side ------------------------------------------------------------------------------
def client_step(method: Method, client: Client, round_: int, phase: str, down: Message) -> Message:
    """One client's work on one message: its set-up if this is its first participation (metered
    in this round), then the method's update; returns the wired upload."""
    if not client.ready:
        client.start_update(round_, "setup")
        seed_torch(client.cfg.seed, "setup", client.cid)  # set-up that draws from torch's global RNG
        method.init_client(client)
        client.ready = True
    client.start_update(round_, phase)
    return wire(method.client_update(client, down, phase), method.name, "client")


def evaluate_client(method: Method, client: Client, splits: Sequence[str] = SPLITS) -> dict[str, int]:
    """Correct predictions of every head on the client's `splits` (validation and test):
    {"HEAD/SPLIT": correct, "n/SPLIT": samples}. Before its set-up a client predicts with its
    untouched model (every head alike). Inference mode, batches of INFER_BATCH, the run's
    precision, one pass over each split for all heads (`Method.predict_heads`,
    `Client.correct_heads`)."""
    heads = method.eval_heads
    if client.ready:
        def predict(x):
            return method.predict_heads(client, x)
    else:
        def predict(x):
            return dict.fromkeys(heads, client.model(x))
    out: dict[str, int] = {}
    for split in splits:
        data = getattr(client.data, split)
        out[f"n/{split}"] = len(data)
        out.update({f"{h}/{split}": n for h, n in client.correct_heads(predict, data, heads).items()})
    return out


def evaluate(method: Method, clients: Sequence[Client]) -> dict[str, np.ndarray]:
    """Personalized test accuracy (percent) of every client, for each of the method's heads."""
    evals = [evaluate_client(method, c) for c in clients]
    return {h: _acc(evals, h, "test") for h in method.eval_heads}


def _acc(evals: Sequence[Mapping[str, int]], head: str, split: str) -> np.ndarray:
    """Per-client accuracy (percent; NaN for a client without samples in the split)."""
    n = np.array([e[f"n/{split}"] for e in evals], dtype=float)
    c = np.array([e[f"{head}/{split}"] for e in evals], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * c / n, np.nan)


def _weighted(evals: Sequence[Mapping[str, int]], head: str, split: str) -> float:
    n = sum(e[f"n/{split}"] for e in evals)
    return 100.0 * sum(e[f"{head}/{split}"] for e in evals) / n if n else float("nan")


# ---- bookkeeping shared by every engine -----------------------------------------------------------
class EvalCache:
    """Each client's latest evaluation, per split. A client that has not taken part in a round
    since then has the same model, state and data, so it is not evaluated again (exact; with
    partial participation most clients are such, e.g. 90% at N100-C10). `reuse = False`
    evaluates all."""

    def __init__(self, clients: int, reuse: bool = True):
        self.clients, self.reuse = clients, reuse
        self.evals: dict[int, dict[str, int]] = {}  # of each client's current model only

    def updated(self, cids) -> None:
        for c in cids:
            self.evals.pop(c, None)

    def due(self, splits: Sequence[str] = SPLITS) -> list[int]:
        """The clients to evaluate now on `splits`."""
        return [c for c in range(self.clients)
                if not self.reuse or any(f"n/{s}" not in self.evals.get(c, {}) for s in splits)]

    def collect(self, fresh: Mapping[int, dict[str, int]]) -> list[dict[str, int]]:
        """Every client's evaluation, `fresh` ones (of the `due` clients) added."""
        for c, e in fresh.items():
            self.evals.setdefault(c, {}).update(e)
        return [self.evals.get(c, {}) for c in range(self.clients)]


class Recorder:
    """Turns what an engine measured (bytes sent, FLOPs run, participation, per-client
    evaluations) into rounds.csv (written atomically after every evaluation) and summary.json."""

    def __init__(self, cfg: RunConfig, method: Method, client_archs: list[str],
                 client_train_samples: list[int], out: str | Path | None = None,
                 on_round: Callable[[dict], None] | None = None):
        self.cfg, self.method, self.heads = cfg, method, tuple(method.eval_heads)
        self.archs, self.train_samples = client_archs, client_train_samples
        self.out = OutputDir(out).path if out is not None else None
        self.on_round = on_round
        self.t0 = self.last_time = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.per_client: list[dict[str, np.ndarray]] = []  # per evaluated round: head/split -> accs
        self.participation = np.zeros(cfg.clients, dtype=int)
        self.cum = {"bytes_up": 0, "bytes_down": 0, "train_flops": 0}
        self.pending = {"bytes_up": 0, "bytes_down": 0}
        self.last_flops = 0

    def participate(self, cids: Sequence[int]) -> None:
        self.participation[list(cids)] += 1

    def traffic(self, down: int, up: int) -> None:
        self.pending["bytes_down"] += down
        self.pending["bytes_up"] += up

    def test_due(self, round_: int, evals: Sequence[Mapping[str, int]]) -> bool:
        """Whether round `round_`, whose validation results are `evals`, needs the test split:
        always with --test-eval every; else at the last round and where some head's mean
        validation accuracy beats its best over the earlier rounds >= 1 (a round the
        validation selection can pick: ties go to the earliest)."""
        if self.cfg.test_eval == "every" or round_ == self.cfg.rounds:
            return True
        if round_ < 1:
            return False
        for i, h in enumerate(self.heads):
            v = _nanmean(_acc(evals, h, "val"))
            col = f"mean_val_acc{'' if i == 0 else f'_{h}'}"
            best = [r[col] for r in self.rows if r["round"] >= 1 and not math.isnan(r[col])]
            if not math.isnan(v) and (not best or v > max(best)):
                return True
        return False

    def record(self, round_: int, evals: Sequence[Mapping[str, int]], flops_total: int, with_test: bool = True) -> dict:
        """One evaluated round: `evals[i]` is client i's `evaluate_client`; `flops_total` the
        clients' cumulative training FLOPs so far; `with_test` False: the test split was not
        evaluated (its columns are NaN)."""
        now = time.perf_counter()
        row: dict[str, Any] = {"round": round_, **self.pending, "train_flops": flops_total - self.last_flops,
                               "wall_seconds": round(now - self.last_time, 3)}
        for k in ("bytes_up", "bytes_down", "train_flops"):
            self.cum[k] += row[k]
            row[f"cum_{k}"] = self.cum[k]
        joined = self.participation > 0
        row["participated"] = int(joined.sum())
        accs = {}
        for i, h in enumerate(self.heads):
            sfx = "" if i == 0 else f"_{h}"
            val = _acc(evals, h, "val")
            test = _acc(evals, h, "test") if with_test else np.full(len(evals), np.nan)
            accs[f"{h}/test"], accs[f"{h}/val"] = test, val
            measured = not np.all(np.isnan(test))
            row.update({f"mean_acc{sfx}": _nanmean(test),
                        f"weighted_acc{sfx}": _weighted(evals, h, "test") if with_test else math.nan,
                        f"mean_val_acc{sfx}": _nanmean(val), f"weighted_val_acc{sfx}": _weighted(evals, h, "val"),
                        f"mean_acc_participated{sfx}": _nanmean(test[joined]),
                        f"min_acc{sfx}": float(np.nanmin(test)) if measured else math.nan,
                        f"max_acc{sfx}": float(np.nanmax(test)) if measured else math.nan,
                        f"std_acc{sfx}": float(np.nanstd(test)) if measured else math.nan})
        self.rows.append(row)
        self.per_client.append(accs)
        self.pending = {"bytes_up": 0, "bytes_down": 0}
        self.last_flops, self.last_time = flops_total, now
        if self.out is not None:
            cols = ROUND_COLUMNS + [c for c in row if c not in ROUND_COLUMNS]
            atomic_write_text(self.out / "rounds.csv", _csv(self.rows, cols))
        if self.on_round is not None:
            self.on_round(row)
        return row

    def selected_index(self, head: str | None = None) -> tuple[int, str]:
        """Index into rows of the validation-selected round (rounds >= 1), and how it was chosen."""
        sfx = "" if head in (None, self.heads[0]) else f"_{head}"
        trained = [i for i, r in enumerate(self.rows) if r["round"] >= 1] or [len(self.rows) - 1]
        val = np.array([self.rows[i][f"mean_val_acc{sfx}"] for i in trained], dtype=float)
        if np.all(np.isnan(val)):
            return trained[-1], SELECTED_FINAL_ROUND
        return trained[int(np.nanargmax(val))], SELECTED_ON_VALIDATION

    def convergence(self) -> dict[str, Any]:
        rounds = np.array([r["round"] for r in self.rows])
        val = np.array([r["mean_val_acc"] for r in self.rows], dtype=float)
        tail = rounds > (1 - CONVERGENCE_TAIL) * self.cfg.rounds
        if not tail.any() or tail.all() or np.all(np.isnan(val[tail])) or np.all(np.isnan(val[~tail])):
            return {"converged": None, "gain": None, "reason": "too few evaluated rounds or no validation data"}
        gain = float(np.nanmax(val[tail]) - np.nanmax(val[~tail]))
        return {"converged": gain < CONVERGENCE_POINTS, "gain": gain, "threshold": CONVERGENCE_POINTS,
                "tail_from_round": int(rounds[tail].min())}

    def summary(self, flops_per_sample: Mapping[str, int], **extra: Any) -> dict[str, Any]:
        head = self.heads[0]
        cls = type(self.method)
        sel, how = self.selected_index()
        trained = [r for r in self.rows if r["round"] >= 1] or self.rows[-1:]
        final, fin_acc = self.rows[-1], self.per_client[-1][f"{head}/test"]
        every = self.cfg.test_eval == "every"  # else no best-on-test view: test was not measured every round
        best_per_client = np.nanmax(np.stack([a[f"{head}/test"] for a, r in zip(self.per_client, self.rows)
                                              if r["round"] >= 1] or [fin_acc]), axis=0) if every else None
        conv = self.convergence()
        s: dict[str, Any] = {
            "method": cls.name,
            "method_version": cls.version,
            "engine": extra.pop("engine", "inprocess"),
            "config": {**self.cfg.to_dict(), "method_options": dict(self.method.hp), "versions": library_versions()},
            "extra_data": cls.extra_data,
            "selected_mean_acc": self.rows[sel]["mean_acc"],
            "selected_round": self.rows[sel]["round"],
            "selection": how,
            "selected_val_mean_acc": self.rows[sel]["mean_val_acc"],
            "selected_weighted_acc": self.rows[sel]["weighted_acc"],
            "selected_mean_acc_participated": self.rows[sel]["mean_acc_participated"],
            "best_mean_acc": max(r["mean_acc"] for r in trained) if every else None,
            "final_mean_acc": final["mean_acc"],
            "final_weighted_acc": final["weighted_acc"],
            "final_mean_acc_participated": final["mean_acc_participated"],
            "final_min_acc": final["min_acc"],
            "final_max_acc": final["max_acc"],
            "final_std_acc": final["std_acc"],
            "per_client_selected_acc": _list(self.per_client[sel][f"{head}/test"]),
            "per_client_best_acc": _list(best_per_client) if every else None,
            "per_client_final_acc": _list(fin_acc),
            "participation": self.participation.tolist(),
            "never_participated": int((self.participation == 0).sum()),
            "converged": conv["converged"],
            "convergence": conv,
            "bytes_up": self.cum["bytes_up"],
            "bytes_down": self.cum["bytes_down"],
            "train_flops": self.cum["train_flops"],
            "flops_per_sample": dict(sorted(flops_per_sample.items())),
            "client_archs": list(self.archs),
            "client_train_samples": list(self.train_samples),
            "rounds_run": self.cfg.rounds,
            "wall_seconds": round(time.perf_counter() - self.t0, 3),
            **extra,
        }
        for h in self.heads[1:]:
            hs, _ = self.selected_index(h)
            s[f"selected_mean_acc_{h}"] = self.rows[hs][f"mean_acc_{h}"]
            s[f"best_mean_acc_{h}"] = max(r[f"mean_acc_{h}"] for r in trained) if every else None
            s[f"final_mean_acc_{h}"] = final[f"mean_acc_{h}"]
        if self.out is not None:
            atomic_write_json(self.out / "summary.json", s)
        return s


def _csv(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    """The rows as CSV, as pandas' `to_csv(index=False)` writes them (NaN as an empty field);
    the csv module, so that a run does not import pandas (0.2-0.3 s of start-up)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in map(r.get, cols)])
    return buf.getvalue()


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if a.size and not np.all(np.isnan(a)) else float("nan")


def _list(a: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in a]


class OutputDir:
    def __init__(self, out: str | Path):
        self.path = Path(out)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to --out {self.path} ({e.strerror}); "
                            "choose a writable directory") from None


# ---- the in-process engine ------------------------------------------------------------------------
@dataclass
class Federation:
    """Every client and the server of one run, in this process."""

    cfg: RunConfig
    method: Method
    clients: list[Client]
    server: Server
    meter: FlopMeter
    public_size: int
    batcher: Batcher | None = None
    evals: EvalCache = field(init=False)

    def __post_init__(self):
        self.evals = EvalCache(len(self.clients))

    @classmethod
    def build(cls, cfg: RunConfig) -> "Federation":
        cfg.validate()
        method = get_method(cfg.method)(**cfg.method_options)
        lean_startup(cfg.device)
        data = federate(cfg.dataset, cfg.clients, PartitionSpec.parse(cfg.partition), cfg.seed,
                        data_root=cfg.data_root, download=cfg.download, val_size=cfg.val_size,
                        public_size=cfg.public_size, train_fraction=cfg.train_fraction,
                        augment=cfg.augment, device=cfg.device, public=cfg.public)
        meter = FlopMeter()
        clients = [Client(i, arch, data.clients[i], data.public, data.info, cfg, meter, method.name)
                   for i, arch in enumerate(zoo_archs(cfg.zoo, cfg.clients))]
        server = Server(cfg, data.info, len(data.public))
        method.init_server(server)
        return cls(cfg, method, clients, server, meter, len(data.public), Batcher() if cfg.batch_clients else None)

    def evaluate(self, splits: Sequence[str] = SPLITS) -> list[dict[str, int]]:
        """Every client's evaluation on `splits` (those unchanged since their last one: reused)."""
        return self.evals.collect({c: evaluate_client(self.method, self.clients[c], splits)
                                   for c in self.evals.due(splits)})

    def exchange(self, downs: dict[int, Message], r: int, phase: str) -> dict[int, Message]:
        """Each participant's update on its message, in this process; with --batch-clients their
        `client.fit` calls train together where they can (engine/batching.py)."""
        updates = {cid: partial(client_step, self.method, self.clients[cid], r, phase, down)
                   for cid, down in downs.items()}
        self.evals.updated(updates)
        if self.batcher is None or len(updates) < 2:
            return {cid: update() for cid, update in updates.items()}
        return self.batcher.run(updates, {cid: self.clients[cid] for cid in updates})

    def play_round(self, r: int, rec: Recorder | None = None) -> list[int]:
        return play_round(self.method, self.server, r, self.exchange, [c.num_train for c in self.clients], rec)


def play_round(method: Method, server: Server, r: int, exchange: Callable[[dict, int, str], dict],
               num_train: Sequence[int], rec: Recorder | None = None) -> list[int]:
    """Round r on any engine: for every phase, the server's message to each participant (wired),
    `exchange(downs, r, phase)` -> each participant's upload (this process or Flower messages),
    the bytes both ways, the server's aggregation. Returns the participants."""
    server.start_round(r)
    cids = participants(server.cfg, r)
    if rec is not None:
        rec.participate(cids)
    for phase in method.phases:
        downs = {cid: wire(method.server_message(server, cid, phase), method.name, "server") for cid in cids}
        ups = exchange(downs, r, phase)
        if rec is not None:
            for cid in cids:
                rec.traffic(message_bytes(downs[cid]), message_bytes(ups[cid]))
        method.aggregate(server, [Upload(cid, num_train[cid], ups[cid]) for cid in cids], phase)
    return cids


def drive(cfg: RunConfig, rec: Recorder, play: Callable[[int], Any],
          evaluate: Callable[[int, Sequence[str]], list], flops: Callable[[], int], bar=None) -> None:
    """Any engine's run: round 0's evaluation, then every round played, evaluated every
    `eval_every` rounds and at the last (`evaluate(round, splits)`; the test split only where
    `rec.test_due`), the progress bar updated."""

    def measure(r: int) -> None:
        if cfg.test_eval == "every":
            rec.record(r, evaluate(r, SPLITS), flops())
            return
        evals = evaluate(r, ("val",))
        test = rec.test_due(r, evals)
        rec.record(r, evaluate(r, ("test",)) if test else evals, flops(), with_test=test)

    try:
        measure(0)
        for r in range(1, cfg.rounds + 1):
            play(r)
            if r % cfg.eval_every == 0 or r == cfg.rounds:
                measure(r)
            if bar is not None:
                last = rec.rows[-1]
                sent = sum(rec.cum[k] + rec.pending[k] for k in ("bytes_up", "bytes_down"))
                acc = (f"acc {last['mean_acc']:.2f}%" if not math.isnan(last["mean_acc"])
                       else f"val acc {last['mean_val_acc']:.2f}%")
                bar.set_postfix_str(f"{acc} (round {last['round']})  sent {_human(sent)}", refresh=False)
                bar.update(1)
    finally:  # also on an error or Ctrl-C: the bar's line ends before the one-line error is printed
        if bar is not None:
            bar.close()


def run(cfg: RunConfig, out: str | Path | None = None, progress: bool = True,
        on_round: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run one federated experiment; write `out`/rounds.csv as it goes and `out`/summary.json
    at the end. Returns the summary."""
    cfg.validate()
    if out is not None:
        OutputDir(out)  # an unwritable --out fails before any data is loaded
    fed = Federation.build(cfg)
    rec = Recorder(cfg, fed.method, [c.arch for c in fed.clients], [c.num_train for c in fed.clients],
                   out, on_round)
    drive(cfg, rec, lambda r: fed.play_round(r, rec), lambda r, splits: fed.evaluate(splits), lambda: fed.meter.total,
          progress_bar(cfg, progress))
    batched = {"batched_steps": fed.batcher.batched_steps} if fed.batcher is not None else {}
    return rec.summary(fed.meter.per_sample, public_size=fed.public_size, **batched)


def progress_bar(cfg: RunConfig, enabled: bool, engine: str = ""):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = f"{cfg.method} {cfg.dataset}" + (f" ({engine})" if engine else "")
    return tqdm(total=cfg.rounds, desc=desc, unit="round", leave=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"
