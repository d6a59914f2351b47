"""`mhpfl bench SUITE --executor ray`: a suite's runs as Ray tasks, on a local Ray instance or a
cluster (`--address auto`, `HOST:PORT` or `ray://HOST:PORT`).

Each run is one Ray task with declared resources (`--run-cpus`, `--run-gpus`; fractional GPUs
let several small runs share one GPU). A task runs the same `execute()` as the local executor
into a temporary folder on its node and returns the finished run's files; the driver writes
them into OUT with the same atomic rename, as each task finishes. So OUT needs no shared
filesystem, a report never reads half a run, and a suite interrupted at any moment keeps every
run that finished. A task whose worker process or node dies is retried by Ray (`max_retries`,
bounded); after that, or on an error in the run itself (never retried: it would fail again),
the run is reported as failed and the others go on.

Data: workers never download. Every node reads the datasets from the data root
(`--data-root`, the same path on every node: a shared filesystem, or a copy per node). The
driver fetches the data once before submitting when it starts the local instance itself (one
machine, one filesystem); on a cluster, stage the data root first. A node without the data fails its
runs with a message naming the node.

Ray is imported only here, only when `--executor ray` is asked for. Usage stats are off.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mhpfl.errors import Interrupted, UserError
from mhpfl.telemetry import telemetry_off

INSTALL_HINT = "pip install 'mhpfl-bench[ray]' (or: pip install ray)"
# GPUs a run reserves by default with --device cuda: four runs share a GPU. Measured on an H200
# (docs/performance.md, "GPU"; benchmarks/paper_cost.py --copies 1 4 8, CIFAR-10 N10 Standalone):
# one run alone left it 79% idle; four at once each ran at 0.83x the speed of one alone, so a round
# cost 0.30x the GPU-seconds (eight: 0.27x, each run at 0.46x)
GPU_SHARE = 0.25


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local instance; "auto", "HOST:PORT", "ray://HOST:PORT"
    run_cpus: float = 1.0  # CPUs reserved per run (also its torch threads unless --threads)
    run_gpus: float | None = None  # GPUs per run; default GPU_SHARE with --device cuda, else 0
    max_retries: int = 2  # retries of a run whose worker or node died
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # more ray.init args for a local instance

    def validate(self, device: str) -> float:
        """Check the options; return the GPUs per run."""
        if self.run_cpus <= 0:
            raise UserError(f"--run-cpus must be > 0 (got {self.run_cpus})")
        if self.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0 (got {self.max_retries})")
        gpus = self.run_gpus if self.run_gpus is not None else (GPU_SHARE if device.startswith("cuda") else 0.0)
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise UserError(f"--run-gpus must be a fraction in (0, 1] or a whole number (got {gpus})")
        if device.startswith("cuda") and gpus == 0:
            raise UserError("--device cuda with --run-gpus 0: Ray hides the GPUs from a task that reserves "
                            "none; pass --run-gpus (e.g. 0.25 to share one GPU among four runs)")
        return gpus


def import_ray():
    telemetry_off()
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _probe(address: str) -> None:
    """Fail fast when HOST:PORT does not answer (ray.init would wait for minutes)."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        if address.startswith("ray://"):
            host, port = hostport, "10001"
        else:
            raise UserError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at --address {address} ({e.strerror or type(e).__name__}); "
                        "start one ('ray start --head') or fix the address") from None


def connect(ray, opts: RayOptions) -> bool:
    """Join or start Ray; returns whether this call started it (and so must shut it down)."""
    if opts.address not in (None, "auto"):
        _probe(opts.address)
    if ray.is_initialized():  # a notebook or a test that connected already
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    # ray.init replaces the SIGTERM handler with a silent sys.exit. Where one was installed (mhpfl.cli:
    # stop the suite, shut Ray down, say which runs are kept), it is put back, and a SIGTERM that came
    # while ray.init ran (Ray's handler: sys.exit) is raised as the CLI's; else Ray's handler stays,
    # whose exit still shuts the instance down.
    ours = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if opts.address is None:
                ray.init(**{**kw, "_node_ip_address": "127.0.0.1", **opts.init_kwargs})
            else:
                try:
                    ray.init(address=opts.address, **kw)
                except (ConnectionError, RuntimeError) as e:
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise UserError(f"cannot join the Ray cluster at --address {opts.address} ({msg}); "
                                    "start one ('ray start --head') or fix the address") from None
    except SystemExit as e:  # a SIGTERM while ray.init ran met Ray's handler: sys.exit(SIGTERM)
        if not callable(ours) or e.code != signal.SIGTERM:
            raise
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever part of the instance had started
        raise Interrupted(signal.SIGTERM) from None  # told by the CLI as its own SIGTERM
    finally:
        if callable(ours):
            signal.signal(signal.SIGTERM, ours)
    return True


def check_resources(ray, run_cpus: float, run_gpus: float, where: str) -> dict[str, Any]:
    """Some node must fit one run, else its tasks would wait forever. Returns the cluster's totals."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = [n.get("Resources", {}) for n in nodes]
    if not any(r.get("CPU", 0) >= run_cpus and r.get("GPU", 0) >= run_gpus for r in res):
        gpus = [r.get("GPU", 0) for r in res]
        if run_gpus > max(gpus, default=0):
            raise UserError(f"--run-gpus {run_gpus:g}: no node of {where} has that many GPUs (GPUs per "
                            f"node: {', '.join(f'{g:g}' for g in gpus) or 'none'}); lower --run-gpus or "
                            "add GPU nodes")
        raise UserError(f"--run-cpus {run_cpus:g} (with --run-gpus {run_gpus:g}): no node of {where} has "
                        f"that much (CPUs per node: {', '.join(format(r.get('CPU', 0), 'g') for r in res)}); "
                        "lower --run-cpus")
    return {"nodes": len(nodes), "CPU": sum(r.get("CPU", 0) for r in res),
            "GPU": sum(r.get("GPU", 0) for r in res)}


def _datasets(config: dict[str, Any]) -> list[str]:
    return [config["dataset"]] + ([config["public"]] if config.get("public", "heldout") != "heldout" else [])


def _run_on_node(job: dict[str, Any], queue, registered: dict[str, type]) -> dict[str, Any]:
    """The Ray task: one run on this node, its files returned to the driver."""
    import tempfile

    import ray

    from mhpfl.benchmark.runner import execute
    from mhpfl.datasets.loaders import dataset_present, default_data_root
    from mhpfl.methods import register

    t0 = time.perf_counter()
    node = {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id()}
    out: dict[str, Any] = {"index": job["index"], "node": node}
    for name, cls in registered.items():  # methods registered in the driver's process
        register(cls, name)
    root = job["config"].get("data_root") or str(default_data_root())
    lacking = [d for d in _datasets(job["config"]) if not dataset_present(d, root)]
    if lacking:
        return {**out, "ok": False, "seconds": 0.0, "error": (
            f"node {node['host']} ({node['ip']}) has no {', '.join(lacking)} under {root}: with "
            "--executor ray every node reads the data from --data-root (the same path on every node: a "
            "shared filesystem or a copy); put it there and rerun")}
    with tempfile.TemporaryDirectory(prefix="mhpfl-run-") as d:
        local = {**job, "tmp": f"{d}/tmp", "final": f"{d}/final"}
        r = execute(local, queue.put if queue is not None else None)
        if r["ok"]:
            final = Path(local["final"])
            r["files"] = {p.relative_to(final).as_posix(): p.read_bytes()
                          for p in sorted(final.rglob("*")) if p.is_file()}
    return {**r, **out, "seconds": round(time.perf_counter() - t0, 1)}


def _write_run(job: dict[str, Any], files: dict[str, bytes]) -> None:
    from mhpfl.benchmark.runner import publish

    tmp = Path(job["tmp"])
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    publish(tmp, Path(job["final"]))


def execute_ray(jobs_spec: list[dict], opts: RayOptions, device: str, methods: set[str],
                bar, log: Callable[[str], None]) -> tuple[list[dict], dict[str, Any]]:
    """Run every job as a Ray task; write each finished run into its final place as it arrives.
    Returns the results (by job index) and a record of the cluster and where each run ran."""
    run_gpus = opts.validate(device)
    ray = import_ray()
    from ray.util.queue import Queue

    from mhpfl.methods import _REGISTERED

    started = connect(ray, opts)
    queue = None
    try:
        where = "the local Ray instance" if opts.address is None else f"the Ray cluster at {opts.address}"
        cluster = check_resources(ray, opts.run_cpus, run_gpus, where)
        log(f"ray: {where}: {cluster['nodes']} node(s), {cluster['CPU']:g} CPUs, {cluster['GPU']:g} GPUs; "
            f"each run reserves {opts.run_cpus:g} CPU(s)" + (f" and {run_gpus:g} GPU(s)" if run_gpus else ""))
        if started and opts.address is None:  # our own instance, one filesystem: fetch the data once here
            from mhpfl.datasets.loaders import load_dataset

            for name, root, download in sorted({(d, j["config"].get("data_root"), j["config"].get("download", True))
                                                for j in jobs_spec for d in _datasets(j["config"])},
                                               key=str):
                load_dataset(name, root, download)
        registered = {m: _REGISTERED[m] for m in methods if m in _REGISTERED}
        queue = Queue(actor_options={"num_cpus": 0})
        task = ray.remote(_run_on_node).options(num_cpus=opts.run_cpus, num_gpus=run_gpus,
                                                max_retries=opts.max_retries, retry_exceptions=False)
        refs = {task.remote(j, queue, registered): j for j in jobs_spec}
        pending, results, done_idx = list(refs), [], set()
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
                _drain(queue, bar, done_idx)
                for ref in ready:
                    job = refs[ref]
                    try:
                        r = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker or node died, retries spent
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        r = {"index": job["index"], "ok": False, "node": None, "seconds": None,
                             "error": f"Ray task failed after {opts.max_retries + 1} attempt(s): "
                                      f"{type(e).__name__}: {first}", "trace": str(e)}
                    if r["ok"]:
                        _write_run(job, r.pop("files"))
                    done_idx.add(job["index"])
                    bar.done(r)
                    results.append(r)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        placement = [{"index": r["index"], "host": (r.get("node") or {}).get("host"),
                      "ip": (r.get("node") or {}).get("ip"), "seconds": r.get("seconds"), "ok": r["ok"]}
                     for r in sorted(results, key=lambda r: r["index"])]
        _log_placement(placement, log)
        return sorted(results, key=lambda r: r["index"]), {
            "executor": "ray", "address": opts.address or "local", "cluster": cluster,
            "run_cpus": opts.run_cpus, "run_gpus": run_gpus, "placement": placement}
    finally:
        if queue is not None:
            try:
                queue.shutdown(force=True)
            except Exception:
                pass
        if started:
            ray.shutdown()


def _drain(queue, bar, done_idx: set[int]) -> None:
    try:
        n = queue.qsize()
        events = queue.get_nowait_batch(n) if n else []
    except Exception:
        return
    for ev in events:
        if ev[1] not in done_idx:
            bar.event(ev)


def _log_placement(placement: list[dict], log: Callable[[str], None]) -> None:
    per_host: dict[str, list[float]] = defaultdict(list)
    for p in placement:
        per_host[f"{p['host']} ({p['ip']})" if p["host"] else "lost (worker died)"].append(p["seconds"] or 0.0)
    log("where the runs ran: " + "; ".join(f"{h}: {len(s)} run(s), {sum(s):.0f} s" for h, s in per_host.items()))
