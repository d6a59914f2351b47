"""benchmarks/clip_count.py, the count behind docs/methods.md's clipping table: it must see every
clipping call the engine makes (a renamed call would silently count none) and leave the run's
results as they are."""
from __future__ import annotations

import json

import mhpfl.engine.context as context
from benchmarks.clip_count import main
from tests.conftest import needs_fmnist

RUN = ["run", "standalone", "--clients", "5", "--rounds", "2", "--train-fraction", "0.02",
       "--val-size", "2000", "--seed", "3", "--quiet", "--force"]


def _count(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@needs_fmnist
def test_clip_count_sees_every_step_and_changes_nothing(tmp_path, capsys):
    clip = context.clip_grad_norm
    tiny = _count(capsys, RUN + ["--grad-clip", "1e-6", "--out", str(tmp_path / "tiny")])
    assert tiny["steps"] > 0 and tiny["clipped"] == tiny["steps"]  # every step is over 1e-6
    default = _count(capsys, RUN + ["--out", str(tmp_path / "counted")])
    assert default["steps"] == tiny["steps"] and default["clipped"] == 0 < default["max_norm"] < 50
    assert context.clip_grad_norm is clip  # restored
    from mhpfl.cli import main as mhpfl_main
    assert mhpfl_main(RUN + ["--out", str(tmp_path / "plain")]) == 0
    counted, plain = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("counted", "plain"))
    for s in (counted, plain):
        s.pop("wall_seconds", None)
        s["config"].pop("out", None)
    assert counted == plain
