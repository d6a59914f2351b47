"""What crosses Flower's wire, and what a SuperNode keeps between messages.

Messages: a method's message (str -> tensor) travels as an ArrayRecord whose Arrays hold each
tensor's raw bytes (dtype and shape as the Array's metadata), so the payload Flower carries is
exactly the bytes the in-process engine counts: sum of len(Array.data) == message_bytes.
`ArrayRecord.count_bytes()` adds the key names; both are recorded.

Client state: between messages a client lives only in its node's `Context.state` (a
RecordDict), never in module globals, so any worker process can serve its next message:
- `RUN.c{cid}.tensors` (ArrayRecord; RUN: a hash of the run's config, so one node can serve several runs): every tensor of its modules' state_dicts and of
  `client.state` (tensors, modules, dicts of them);
- `RUN.c{cid}.meta` (ConfigRecord): whether the method set it up, the layout of `client.state`
  and its plain values (JSON).
A client is rebuilt from them: a fresh `Client` (same seeded model), the method's
`init_client` replayed for its *structure* only (`fit`/`infer` do nothing and charge nothing
then: FedMD's transfer learning is not redone), then every stored tensor loaded over it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch
from torch import nn

from mhpfl.errors import UserError

RAW = "mhpfl.raw"  # Array.stype: the tensor's bytes as laid out in memory (row-major)


def to_record(message: Mapping[str, torch.Tensor]):
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for k, t in message.items():
        t = t.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        rec[k] = Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW, data=data)
    return rec


def from_record(rec, device: str = "cpu") -> dict[str, torch.Tensor]:
    out = {}
    for k, a in rec.items():
        if a.stype != RAW:
            raise UserError(f"array '{k}' arrived as {a.stype}, not {RAW}: client and server must run mhpfl")
        dtype = getattr(torch, a.dtype)
        if math.prod(a.shape) == 0:
            t = torch.empty(a.shape, dtype=dtype)
        else:
            t = torch.frombuffer(bytearray(a.data), dtype=torch.uint8).view(dtype).reshape(a.shape)
        out[k] = t.to(device)
    return out


def payload_bytes(rec) -> int:
    return sum(len(a.data) for a in rec.values())


def key_bytes(rec) -> int:
    return sum(len(k) for k in rec)


# ---- a client's state in Context.state -------------------------------------------------------------
def _pack(value: Any, path: str, tensors: dict[str, torch.Tensor], method: str) -> dict:
    if torch.is_tensor(value):
        tensors[path] = value
        return {"t": 1}
    if isinstance(value, nn.Module):
        for k, v in value.state_dict().items():
            tensors[f"{path}/{k}"] = v
        return {"m": 1}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"d": {k: _pack(v, f"{path}.{k}", tensors, method) for k, v in value.items()}}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise UserError(f"{method}: client.state{path[1:]} holds a {type(value).__name__}; on the flower "
                        "engine a client keeps tensors, modules, dicts of them and plain values") from None
    return {"v": value}


def _unpack(layout: dict, current: Any, path: str, tensors: Mapping[str, torch.Tensor], device: str) -> Any:
    if "t" in layout:
        return tensors[path].to(device)
    if "m" in layout:
        if not isinstance(current, nn.Module):
            raise UserError(f"client.state{path[1:]}: the method's init_client did not rebuild this module")
        prefix = f"{path}/"
        current.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return current
    if "d" in layout:
        cur = current if isinstance(current, dict) else {}
        return {k: _unpack(sub, cur.get(k), f"{path}.{k}", tensors, device) for k, sub in layout["d"].items()}
    return layout["v"]


def save_client(context, client, run: str) -> None:
    from flwr.app import ConfigRecord

    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(client.modules):
        for k, v in m.state_dict().items():
            tensors[f"m{i}/{k}"] = v
    layout = _pack(client.state, "s", tensors, client.method_name)
    context.state[f"{run}.c{client.cid}.tensors"] = to_record(tensors)
    context.state[f"{run}.c{client.cid}.meta"] = ConfigRecord({
        "ready": bool(client.ready), "modules": len(client.modules), "layout": json.dumps(layout)})


def restore_client(context, client, method, run: str) -> None:
    """Bring a freshly built `client` back to the state saved in `context` (no-op for a client
    never saved: it has not participated yet)."""
    from mhpfl.seeding import seed_torch

    key = f"{run}.c{client.cid}.meta"
    if key not in context.state.config_records:
        return
    meta = context.state.config_records[key]
    tensors = from_record(context.state.array_records[f"{run}.c{client.cid}.tensors"], client.cfg.device)
    if meta["ready"]:  # rebuild the structure the method's set-up creates, without its work
        client.fit = lambda *a, **k: 0.0
        client.infer = lambda fn, data, batch_size=1024: torch.empty(0)
        try:
            client.start_update(0, "setup")
            seed_torch(client.cfg.seed, "setup", client.cid)
            method.init_client(client)
        finally:
            del client.fit, client.infer
        client.ready = True
    if len(client.modules) != meta["modules"]:
        raise UserError(f"{method.name}: client {client.cid} had {meta['modules']} modules, its set-up rebuilds "
                        f"{len(client.modules)}; on the flower engine a method creates its modules in init_client")
    for i, m in enumerate(client.modules):
        prefix = f"m{i}/"
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    client.state = _unpack(json.loads(meta["layout"]), client.state, "s", tensors, client.cfg.device)
