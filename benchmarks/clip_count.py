"""How often gradient-norm clipping (`--grad-clip`, default 50) acts in one run. Run by hand, not by
pytest, with the arguments of `mhpfl run`:

    python benchmarks/clip_count.py run fml --clients 10 --rounds 80 --train-fraction 0.05 \\
        --eval-every 8 --val-size 5000 --seed 0 --out /tmp/clip-fml --quiet

It wraps the engine's one clipping call (`FitRun.update` -> `clip_grad_norm`) to record every
step's total gradient norm, runs the command unchanged (the clipping itself is the engine's), and
prints one JSON line: clipped steps, all steps, the largest norm and the first clipped norms.
On CPU (where the engine reads the norm anyway) the run's results are the same as without it.
With `--grad-clip 0` the engine makes no clipping call, so nothing is counted (steps 0).
Measured figures: docs/methods.md, "Deviations from the papers that remain".
"""
from __future__ import annotations

import json
import sys

import torch

import mhpfl.engine.context as context
from mhpfl import cli


def main(argv: list[str]) -> int:
    stats = {"steps": 0, "clipped": 0, "max_norm": 0.0, "clipped_norms": []}
    clip = context.clip_grad_norm

    def counting(params, max_norm):
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        stats["steps"] += 1
        stats["max_norm"] = max(stats["max_norm"], norm)
        if not max_norm / (norm + 1e-6) >= 1.0:  # the engine's own test (lean.clip_grad_norm)
            stats["clipped"] += 1
            stats["clipped_norms"].append(round(norm, 2))
        clip(params, max_norm)

    context.clip_grad_norm = counting
    try:
        rc = cli.main(argv)
    finally:
        context.clip_grad_norm = clip
    stats["clipped_norms"] = stats["clipped_norms"][:20]
    print(json.dumps({"command": " ".join(argv[:2]), "exit": rc, **stats}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
