"""Helpers of the tests/test_bench_*.py files: tiny suite files and in-process test methods."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from mhpfl.methods.base import Method

TINY = """
name = "{name}"
methods = {methods}
seeds = [0]
[defaults]
dataset = "fmnist"
clients = 5
frac = 1.0
rounds = {rounds}
train_fraction = 0.05
batch_size = 32
eval_every = {rounds}
download = false
data_root = "{data_root}"
[[settings]]
name = "A"
{extra}
"""


def write_suite(tmp: Path, data_root: str, *, name: str = "tiny", methods=("standalone",), rounds: int = 2,
                extra: str = "") -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(TINY.format(name=name, methods=list(methods), rounds=rounds, data_root=data_root, extra=extra)
                 .replace("'", '"'))
    return p


class Probe(Method):
    """Standalone plus a dummy upload of `upload` floats; `broken_predict` predicts class 0 only.
    Subclassed by the tests to make 'a method whose bytes or accuracy changed'."""

    name = "probe"
    description = "test method"
    upload = 10
    broken_predict = False

    def client_update(self, client, message, phase):
        client.fit(client.model.parameters(), lambda x, y: F.cross_entropy(client.model(x), y))
        return {"w": torch.zeros(self.upload)}

    def predict(self, client, x, head):
        out = client.model(x)
        if self.broken_predict:
            out = torch.zeros_like(out)
            out[:, 0] = 1.0
        return out


class Stopper(Probe):
    """Ctrl-C / SIGTERM arriving in the middle of its run (mhpfl.cli turns SIGTERM into this)."""

    def client_update(self, client, message, phase):
        import signal

        from mhpfl.errors import Interrupted

        raise Interrupted(signal.SIGTERM)


def squash(md: str) -> str:
    """A markdown table with its cell padding collapsed ("| a   |   b |" -> "| a | b |")."""
    return re.sub(r" {2,}", " ", md)
