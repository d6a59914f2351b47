"""The Flower app: a ServerApp and a ClientApp (Flower's Message API) that run any `Method`
unchanged, with the same per-client and per-round mechanics as the in-process engine
(`client_step`, `evaluate_client`, `Recorder`).

Messages (every one carries a ConfigRecord "task": the run's config as JSON, the client id, the
round and the phase; metadata like the sample counts, not payload):
- query "hello" (to every node, once): which clients the node hosts (partition-id modulo
  num-partitions), their architectures and training-sample counts;
- train (to each participant, per phase): ArrayRecord "down" = the server's message; reply
  ArrayRecord "up" = the client's upload, MetricRecord "metrics" = the FLOPs it ran;
- evaluate (to every client due, each evaluated round; its task names the splits): reply
  MetricRecord of correct counts per head and split.

Simulation: `run_flower` (used by `mhpfl run METHOD --engine flower`). Deployment: the
module-level `server_app` and `client_app`, named by the Flower App that
`mhpfl run METHOD --engine flower --flower-app DIR` writes (see docs/scale-out.md).
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mhpfl.telemetry import telemetry_off

telemetry_off()

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from mhpfl.config import RunConfig  # noqa: E402
from mhpfl.datasets import PartitionSpec, dataset_info, federate  # noqa: E402
from mhpfl.engine.context import Client, Server  # noqa: E402
from mhpfl.engine.meter import FlopMeter  # noqa: E402
from mhpfl.engine.runner import (EvalCache, Recorder, client_step, drive, evaluate_client,  # noqa: E402
                                 play_round, progress_bar)
from mhpfl.errors import UserError  # noqa: E402
from mhpfl.flower.records import (from_record, key_bytes, payload_bytes, restore_client,  # noqa: E402
                                  save_client, to_record)
from mhpfl.lean import deterministic_algorithms  # noqa: E402
from mhpfl.messages import message_bytes  # noqa: E402
from mhpfl.methods import get_method  # noqa: E402
from mhpfl.models import zoo_archs  # noqa: E402


# ---- client side ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _federation(config_json: str):
    """The federated data of a run (deterministic from its config; decoded once per process)."""
    cfg = RunConfig.from_dict(json.loads(config_json))
    return federate(cfg.dataset, cfg.clients, PartitionSpec.parse(cfg.partition), cfg.seed,
                    data_root=cfg.data_root, download=cfg.download, val_size=cfg.val_size,
                    public_size=cfg.public_size, train_fraction=cfg.train_fraction,
                    augment=cfg.augment, device=cfg.device, public=cfg.public)


def _hosted(context: Context, clients: int) -> list[int]:
    nc = context.node_config
    pid, n = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
    if not 0 <= pid < n:
        raise UserError(f"node config partition-id={pid} num-partitions={n}: need 0 <= partition-id < num-partitions")
    return [c for c in range(clients) if c % n == pid]


def _client(task: ConfigRecord, context: Context):
    """The client a message is for, rebuilt from this node's Context.state."""
    cfg = RunConfig.from_dict(json.loads(task["config"]))
    deterministic_algorithms(cfg.device)
    cid = int(task["cid"])
    if cid not in _hosted(context, cfg.clients):
        raise UserError(f"client {cid} is not hosted by this node ({dict(context.node_config)})")
    method = get_method(cfg.method)(**cfg.method_options)
    data = _federation(task["config"])
    arch = zoo_archs(cfg.zoo, cfg.clients)[cid]
    client = Client(cid, arch, data.clients[cid], data.public, data.info, cfg, FlopMeter(), method.name)
    restore_client(context, client, method, str(task["run"]))
    return method, client


def _per_sample(client: Client) -> ConfigRecord:
    return ConfigRecord({k: int(v) for k, v in client.meter.per_sample.items()})


client_app = ClientApp()


@client_app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    task = msg.content["task"]
    cfg = RunConfig.from_dict(json.loads(task["config"]))
    data = _federation(task["config"])
    cids = _hosted(context, cfg.clients)
    archs = zoo_archs(cfg.zoo, cfg.clients)
    return Message(RecordDict({"hosted": ConfigRecord({
        "cids": cids, "archs": [archs[c] for c in cids],
        "train": [len(data.clients[c].train) for c in cids], "public_size": len(data.public)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    task = msg.content["task"]
    method, client = _client(task, context)
    down = from_record(msg.content["down"], client.cfg.device)
    up = client_step(method, client, int(task["round"]), str(task["phase"]), down)
    save_client(context, client, str(task["run"]))
    return Message(RecordDict({"up": to_record(up), "per_sample": _per_sample(client),
                               "metrics": MetricRecord({"cid": client.cid, "train_flops": int(client.meter.total)})}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    method, client = _client(msg.content["task"], context)
    counts = evaluate_client(method, client, str(msg.content["task"]["splits"]).split(","))
    return Message(RecordDict({"per_sample": _per_sample(client),
                               "metrics": MetricRecord({"cid": client.cid, **{k: int(v) for k, v in counts.items()}})}),
                   reply_to=msg)


# ---- server side ----------------------------------------------------------------------------------
class _Federation:
    """The server's view: which node hosts which client, and one send-and-receive per step."""

    def __init__(self, grid: Grid, cfg: RunConfig, wait_s: float):
        self.grid, self.cfg = grid, cfg
        self.config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        self.run = hashlib.sha256(self.config_json.encode()).hexdigest()[:12]
        nodes = self._nodes(wait_s)
        self.node_of: dict[int, int] = {}
        self.archs: dict[int, str] = {}
        self.train: dict[int, int] = {}
        self.public_size = 0
        for reply in self._send([(n, "query.hello", RecordDict({"task": self._task(-1, 0, "hello")}))
                                 for n in nodes]):
            h = reply.content["hosted"]
            for c, a, t in zip(h["cids"], h["archs"], h["train"]):
                self.node_of[int(c)], self.archs[int(c)], self.train[int(c)] = reply.metadata.src_node_id, a, int(t)
            self.public_size = int(h["public_size"])
        missing = sorted(set(range(cfg.clients)) - set(self.node_of))
        if missing:
            raise UserError(f"no SuperNode hosts client(s) {missing}: start one per partition-id "
                            f"(--node-config 'partition-id=I num-partitions=N') for all {cfg.clients} clients")
        self.per_sample: dict[str, int] = {}
        self.flops = 0
        self.count_bytes = {"up": 0, "down": 0}
        self.key_bytes = {"up": 0, "down": 0}
        self.evals = EvalCache(cfg.clients)

    def _nodes(self, wait_s: float) -> list[int]:
        t0 = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if nodes or time.monotonic() - t0 > wait_s:
                break
            time.sleep(0.5)
        if not nodes:
            raise UserError(f"no SuperNode connected within {wait_s:.0f} s; start flower-supernode(s)")
        if len(nodes) < self.cfg.clients:  # deployment: give late nodes a moment
            time.sleep(min(2.0, wait_s))
            nodes = sorted(self.grid.get_node_ids())
        return nodes

    def _task(self, cid: int, round_: int, phase: str) -> ConfigRecord:
        return ConfigRecord({"config": self.config_json, "run": self.run, "cid": cid, "round": round_,
                             "phase": phase})

    def _send(self, items: list[tuple[int, str, RecordDict]]) -> list[Message]:
        msgs = [Message(content, dst_node_id=node, message_type=kind) for node, kind, content in items]
        replies = list(self.grid.send_and_receive(msgs))
        for r in replies:
            if r.has_error():
                raise UserError(f"a ClientApp failed: {r.error.reason}")
        if len(replies) != len(msgs):
            raise UserError(f"{len(msgs) - len(replies)} of {len(msgs)} messages got no reply (a SuperNode left?)")
        return replies

    def _absorb(self, reply: Message) -> int:
        self.per_sample.update({k: int(v) for k, v in reply.content["per_sample"].items()})
        return int(reply.content["metrics"]["cid"])

    def exchange(self, downs: dict[int, dict[str, torch.Tensor]], round_: int,
                 phase: str) -> dict[int, dict[str, torch.Tensor]]:
        """Each participant's update, as Flower messages to the SuperNodes that host them."""
        items = []
        self.evals.updated(downs)
        for cid, down in downs.items():
            rd = to_record(down)
            assert payload_bytes(rd) == message_bytes(down)
            self.count_bytes["down"] += rd.count_bytes()
            self.key_bytes["down"] += key_bytes(rd)
            items.append((self.node_of[cid], "train",
                          RecordDict({"down": rd, "task": self._task(cid, round_, phase)})))
        ups: dict[int, dict[str, torch.Tensor]] = {}
        for reply in self._send(items):
            cid = self._absorb(reply)
            ru = reply.content["up"]
            up = from_record(ru, self.cfg.device)
            assert payload_bytes(ru) == message_bytes(up)
            self.count_bytes["up"] += ru.count_bytes()
            self.key_bytes["up"] += key_bytes(ru)
            self.flops += int(reply.content["metrics"]["train_flops"])
            ups[cid] = up
        return ups

    def evaluate(self, round_: int, splits: Sequence[str]) -> list[dict[str, int]]:
        """Every client's evaluation on `splits`, as messages to the clients due (EvalCache: the
        others' are reused, as in the in-process engine)."""
        due = self.evals.due(splits)
        tasks = {c: self._task(c, round_, "evaluate") for c in due}
        for t in tasks.values():
            t["splits"] = ",".join(splits)
        replies = self._send([(self.node_of[c], "evaluate", RecordDict({"task": t}))
                              for c, t in tasks.items()]) if due else []
        fresh = {}
        for r in replies:
            fresh[self._absorb(r)] = {k: int(v) for k, v in r.content["metrics"].items() if k != "cid"}
        return self.evals.collect(fresh)


def serve(grid: Grid, cfg: RunConfig, out: str | Path | None = None, progress: bool = False,
          on_round: Callable[[dict], None] | None = None, wait_s: float = 60.0) -> dict[str, Any]:
    """The ServerApp's work: the same round loop as the in-process engine, over messages."""
    import flwr

    deterministic_algorithms(cfg.device)
    cfg.validate()
    method = get_method(cfg.method)(**cfg.method_options)
    fed = _Federation(grid, cfg, wait_s)
    server = Server(cfg, dataset_info(cfg.dataset), fed.public_size)
    method.init_server(server)
    train = [fed.train[c] for c in range(cfg.clients)]
    rec = Recorder(cfg, method, [fed.archs[c] for c in range(cfg.clients)], train, out, on_round)
    drive(cfg, rec, lambda r: play_round(method, server, r, fed.exchange, train, rec), fed.evaluate,
          lambda: fed.flops, progress_bar(cfg, progress, "flower"))
    return rec.summary(fed.per_sample, public_size=fed.public_size, engine="flower",
                       engine_version=flwr.__version__,
                       flower={"array_record_count_bytes_up": fed.count_bytes["up"],
                               "array_record_count_bytes_down": fed.count_bytes["down"],
                               "array_record_key_bytes_up": fed.key_bytes["up"],
                               "array_record_key_bytes_down": fed.key_bytes["down"]})


# deployment (`flwr run`): the run's config comes from the Flower App's run config
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = RunConfig.from_dict(json.loads(str(rc["mhpfl-config"])))
    serve(grid, cfg, out=str(rc["out"]), wait_s=float(rc.get("wait-seconds", 60)))
