"""The round loop: sample participants, exchange messages phase by phase, meter, evaluate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from mhpfl.config import RunConfig, library_versions
from mhpfl.datasets import PartitionSpec, federate
from mhpfl.engine.context import Client, Server
from mhpfl.messages import Upload
from mhpfl.engine.meter import FlopMeter, message_bytes
from mhpfl.errors import UserError
from mhpfl.io import atomic_write_json, atomic_write_text
from mhpfl.methods import Method, get_method
from mhpfl.models import zoo_archs
from mhpfl.lean import lean_startup
from mhpfl.seeding import np_rng

TIMING_FIELDS = ("wall_seconds",)
ROUND_COLUMNS = ["round", "mean_acc", "min_acc", "max_acc", "std_acc", "bytes_up", "bytes_down",
                 "train_flops", "cum_bytes_up", "cum_bytes_down", "cum_train_flops", "wall_seconds"]


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
    m = max(1, int(round(cfg.frac * cfg.clients)))
    return sorted(np_rng(cfg.seed, "sample", round_).choice(cfg.clients, m, replace=False).tolist())


def evaluate(method: Method, clients: list[Client]) -> dict[str, np.ndarray]:
    """Personalized test accuracy (percent) of every client, for each of the method's heads."""
    accs = {h: np.zeros(len(clients)) for h in method.eval_heads}
    for i, c in enumerate(clients):
        for h in method.eval_heads:
            accs[h][i] = c.accuracy(lambda x: method.predict(c, x, h), c.data.test)
    return accs


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


def run(cfg: RunConfig, out: str | Path | None = None, progress: bool = True,
        on_round: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run one federated experiment; write `out`/rounds.csv as it goes and `out`/summary.json
    at the end. Returns the summary."""
    cfg.validate()
    outdir = OutputDir(out) if out is not None else None
    t0 = time.perf_counter()
    cls = get_method(cfg.method)
    method = cls(**cfg.method_options)
    lean_startup(cfg.device)
    data = federate(cfg.dataset, cfg.clients, PartitionSpec.parse(cfg.partition), cfg.seed,
                    data_root=cfg.data_root, download=cfg.download, val_size=cfg.val_size,
                    public_size=cfg.public_size, train_fraction=cfg.train_fraction,
                    augment=cfg.augment, device=cfg.device, public=cfg.public)
    meter = FlopMeter()
    clients = [Client(i, arch, data.clients[i], data.public, data.info, cfg, meter, cls.name)
               for i, arch in enumerate(zoo_archs(cfg.zoo, cfg.clients))]
    server = Server(cfg, data.info, len(data.public))

    rows: list[dict[str, Any]] = []
    best = {h: np.full(cfg.clients, -1.0) for h in cls.eval_heads}
    best_mean = {h: -1.0 for h in cls.eval_heads}
    cum = {"bytes_up": 0, "bytes_down": 0, "train_flops": 0}
    pending = {"bytes_up": 0, "bytes_down": 0}
    last = {"flops": 0, "time": time.perf_counter()}
    final: dict[str, np.ndarray] = {}

    def record(round_: int) -> None:
        nonlocal final
        accs = evaluate(method, clients)
        final = accs
        now = time.perf_counter()
        row = {"round": round_, "bytes_up": pending["bytes_up"], "bytes_down": pending["bytes_down"],
               "train_flops": meter.total - last["flops"], "wall_seconds": round(now - last["time"], 3)}
        for k in ("bytes_up", "bytes_down", "train_flops"):
            cum[k] += row[k]
            row[f"cum_{k}"] = cum[k]
        for i, h in enumerate(cls.eval_heads):
            a = accs[h]
            sfx = "" if i == 0 else f"_{h}"
            row.update({f"mean_acc{sfx}": a.mean(), f"min_acc{sfx}": a.min(), f"max_acc{sfx}": a.max(),
                        f"std_acc{sfx}": a.std()})
            best[h] = np.maximum(best[h], a)
            best_mean[h] = max(best_mean[h], float(a.mean()))
        rows.append(row)
        pending.update(bytes_up=0, bytes_down=0)
        last.update(flops=meter.total, time=now)
        if outdir is not None:
            cols = ROUND_COLUMNS + [c for c in row if c not in ROUND_COLUMNS]
            atomic_write_text(outdir.path / "rounds.csv", pd.DataFrame(rows)[cols].to_csv(index=False))
        if on_round is not None:
            on_round(row)

    # setup (round 0): clients' one-off work (e.g. FedMD's transfer learning) is metered too
    for c in clients:
        c.start_update(0, "setup")
        method.init_client(c)
    method.init_server(server)
    record(0)

    bar = _progress(cfg, progress)
    for r in range(1, cfg.rounds + 1):
        server.start_round(r)
        for phase in cls.phases:
            uploads = []
            for cid in participants(cfg, r):
                down = wire(method.server_message(server, cid, phase), cls.name, "server")
                pending["bytes_down"] += message_bytes(down)
                clients[cid].start_update(r, phase)
                up = wire(method.client_update(clients[cid], down, phase), cls.name, "client")
                pending["bytes_up"] += message_bytes(up)
                uploads.append(Upload(cid, clients[cid].num_train, up))
            method.aggregate(server, uploads, phase)
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            record(r)
        if bar is not None:
            sent = cum["bytes_up"] + cum["bytes_down"] + pending["bytes_up"] + pending["bytes_down"]
            bar.set_postfix_str(f"acc {rows[-1]['mean_acc']:.2f}% (round {rows[-1]['round']})  sent {_human(sent)}",
                                refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()

    head = cls.eval_heads[0]
    summary: dict[str, Any] = {
        "method": cls.name,
        "method_version": cls.version,
        "config": {**cfg.to_dict(), "method_options": dict(method.hp), "versions": library_versions()},
        "best_mean_acc": best_mean[head],
        "final_mean_acc": float(final[head].mean()),
        "final_min_acc": float(final[head].min()),
        "final_max_acc": float(final[head].max()),
        "final_std_acc": float(final[head].std()),
        "per_client_best_acc": best[head].tolist(),
        "per_client_final_acc": final[head].tolist(),
        "bytes_up": cum["bytes_up"],
        "bytes_down": cum["bytes_down"],
        "train_flops": cum["train_flops"],
        "flops_per_sample": dict(sorted(meter.per_sample.items())),
        "client_archs": [c.arch for c in clients],
        "client_train_samples": [c.num_train for c in clients],
        "rounds_run": cfg.rounds,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    for h in cls.eval_heads[1:]:
        summary[f"best_mean_acc_{h}"] = best_mean[h]
        summary[f"final_mean_acc_{h}"] = float(final[h].mean())
    if outdir is not None:
        atomic_write_json(outdir.path / "summary.json", summary)
    return summary


def _progress(cfg: RunConfig, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.rounds, desc=f"{cfg.method} {cfg.dataset}", unit="round", leave=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"
