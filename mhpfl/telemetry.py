"""Third-party reporting off: Ray's usage stats and Flower's telemetry, before either starts.

Called by every code path that imports Ray or Flower. A user who wants them on sets the
variables themselves (setdefault keeps their choice). Ray's autoscaler/Tune look for
~/ray_bootstrap_config.yaml; an empty one is created if none exists (a real one is left alone).
"""
from __future__ import annotations

import os
from pathlib import Path


def telemetry_off() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        boot = Path.home() / "ray_bootstrap_config.yaml"
        if not boot.exists():
            boot.touch()
    except OSError:
        pass
