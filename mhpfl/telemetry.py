"""Third-party reporting off: Ray's usage stats, Flower's telemetry and the update check that
Flower's command-line tools (`flwr`, `flower-superlink`, `flower-supernode`) make to Flower's
servers at start-up, before any of them starts (child processes inherit the variables).

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
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    try:
        boot = Path.home() / "ray_bootstrap_config.yaml"
        if not boot.exists():
            boot.touch()
    except OSError:
        pass
