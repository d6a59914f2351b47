"""The Flower engine: `mhpfl run METHOD --engine flower`.

The same Method classes, unchanged, as a Flower app on Flower's Message API (mhpfl/flower/app.py):
in Flower's simulation runtime by default (`run_flower`), or as a real federation of a
SuperLink and SuperNodes (`write_app` writes the Flower App that `flwr run` submits).
Flower is imported only here, only when asked for; its telemetry and its tools' update check
are off unless the user turns them on (mhpfl/telemetry.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

from mhpfl.config import RunConfig
from mhpfl.errors import UserError
from mhpfl.telemetry import telemetry_off

INSTALL_HINT = "pip install 'mhpfl-bench[flower]' (or: pip install 'flwr[simulation]')"


def _import_flwr():
    telemetry_off()
    try:
        import flwr  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401
        import ray  # noqa: F401  (Flower's simulation runtime)
    except ImportError:
        raise UserError(f"--engine flower needs Flower with its simulation runtime, which is not installed: "
                        f"{INSTALL_HINT}") from None


def _not_the_run_simulation_notice(record) -> bool:
    """Flower 1.42's banner on `run_simulation`'s deprecation, printed on every run, asks nothing of
    mhpfl's users: pyproject caps flwr below 2, and the written Flower App already runs on the
    successor, flwr's managed local SuperLink (docs/scale-out.md, tests/test_flower_deployment.py)."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def run_flower(cfg: RunConfig, out: str | Path | None = None, progress: bool = True,
               on_round: Callable[[dict], None] | None = None, *, cpus: int | None = None,
               client_cpus: float = 1.0) -> dict[str, Any]:
    """One run in Flower's simulation runtime: one virtual SuperNode per client, ClientApps on
    Ray actors (`client_cpus` each, `cpus` in all: default this machine's), loopback only."""
    return simulate([cfg], [out], progress, on_round, cpus=cpus, client_cpus=client_cpus)[0]


def _no_batching(cfg: RunConfig) -> None:
    if cfg.batch_clients:
        raise UserError("--batch-clients batches clients inside one process (the in-process engine); a "
                        "Flower federation runs each client in its own ClientApp: leave it out with --engine flower")


def simulate(cfgs: list[RunConfig], outs: list[str | Path | None], progress: bool = True,
             on_round: Callable[[dict], None] | None = None, *, cpus: int | None = None,
             client_cpus: float = 1.0) -> list[dict[str, Any]]:
    """Several runs one after the other in one Flower simulation (one start of its runtime);
    each run's clients keep their state under their own keys of the nodes' Context.state."""
    from mhpfl.engine.runner import OutputDir

    _import_flwr()
    for cfg, out in zip(cfgs, outs, strict=True):
        cfg.validate()
        _no_batching(cfg)
        if cfg.device != cfgs[0].device:
            raise UserError("runs simulated together must share one --device")
        if out is not None:
            OutputDir(out)
    from mhpfl.datasets.loaders import load_dataset

    for cfg in cfgs:  # one machine: decode (or download) the data once here, not in every ClientApp
        for name in [cfg.dataset] + ([cfg.public] if cfg.public != "heldout" else []):
            load_dataset(name, cfg.data_root, cfg.download)
    import logging

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from mhpfl.flower.app import client_app, serve

    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            result["summaries"] = [serve(grid, cfg, out, progress, on_round) for cfg, out in zip(cfgs, outs)]
        except BaseException as e:  # carried out of Flower's thread, raised below
            result["error"] = e

    init_args: dict[str, Any] = {"include_dashboard": False, "_node_ip_address": "127.0.0.1",
                                 "log_to_driver": False, "configure_logging": False}
    if cpus is not None:
        init_args["num_cpus"] = cpus
    gpus = 1.0 if cfgs[0].device.startswith("cuda") else 0.0
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)
    flwr_log.addFilter(_not_the_run_simulation_notice)
    try:
        with warnings.catch_warnings():  # Ray's tip on a future default for 0-GPU tasks: ours work either way
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=max(c.clients for c in cfgs),
                           backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus},
                                           "init_args": init_args})
    finally:
        flwr_log.removeFilter(_not_the_run_simulation_notice)
        flwr_log.setLevel(level)
    if "error" in result:
        raise result["error"]
    if "summaries" not in result:
        raise UserError("the Flower simulation ended without a result (see Flower's log above)")
    return result["summaries"]


APP_PYPROJECT = """\
# A Flower App running mhpfl's {method} ({name}); written by `mhpfl run ... --engine flower --flower-app`.
# Submit it to a SuperLink (a deployment, or address ":local:" for Flower's local simulation):
#   flwr run {app_dir} CONNECTION --stream
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "mhpfl-bench: {method} as a Flower federation"
license = "MIT"
dependencies = []  # mhpfl-bench[flower] must be installed where the SuperLink and SuperNodes run

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mhpfl"

[tool.flwr.app.components]
serverapp = "mhpfl.flower.app:server_app"
clientapp = "mhpfl.flower.app:client_app"

[tool.flwr.app.config]
mhpfl-config = {config}
out = {out}
wait-seconds = 60
"""


def write_app(cfg: RunConfig, app_dir: str | Path, out: str | Path) -> Path:
    """Write a Flower App (pyproject.toml) that runs `cfg` on SuperNodes; the ServerApp writes
    summary.json and rounds.csv into `out` (an absolute path on the SuperLink's machine)."""
    cfg.validate()
    _no_batching(cfg)
    app = Path(app_dir)
    try:
        app.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --flower-app {app} ({e.strerror})") from None
    name = f"mhpfl-{cfg.method}".replace("_", "-")
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(
        method=cfg.method, name=name, app_dir=app,
        config=json.dumps(json.dumps(cfg.to_dict(), sort_keys=True)),
        out=json.dumps(str(Path(out).resolve()))))
    return app
