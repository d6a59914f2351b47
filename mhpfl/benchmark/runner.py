"""Running a suite: cached, resumable, optionally in parallel.

Layout of an output folder:
  OUT/suite.json, OUT/suite.toml   the plan of the suite last run into OUT (what `report` reads)
  OUT/runs/METHOD-KEY/             one finished run: summary.json, rounds.csv, run.json
  OUT/.inflight/METHOD-KEY.PID/    a run in progress (renamed into runs/ when it finishes)
  OUT/failed/METHOD-KEY.txt        the error of a run that failed (it reruns next time)
  OUT/bench.json                   the bench sessions that trained something (time, machine)

A run directory appears in runs/ only by an atomic rename of a complete directory, so a suite
killed at any moment (even kill -9) loses at most the runs in flight, and a report never reads
a half-written run. Leftover .inflight directories of dead processes are removed at the next
start.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mhpfl.benchmark.suite import Entry, Suite

if TYPE_CHECKING:
    from mhpfl.benchmark.ray_executor import RayOptions
from mhpfl.errors import Interrupted, UserError
from mhpfl.io import atomic_write_json, atomic_write_text
from mhpfl.results import ROUNDS, DamagedResult, load_summary, rounds_problem


def run_dirname(e: Entry) -> str:
    return f"{e.method}-{e.key}"


def finished(out: Path, e: Entry) -> bool:
    """True if the run's summary.json exists and passes the schema check (mhpfl.results)."""
    return damaged(out, e) is None and (out / "runs" / run_dirname(e) / "summary.json").is_file()


def damaged(out: Path, e: Entry) -> DamagedResult | None:
    """The error of a finished-looking run whose summary.json cannot be trusted, else None."""
    f = out / "runs" / run_dirname(e) / "summary.json"
    if not f.exists():
        return None
    try:
        load_summary(f)
    except DamagedResult as err:
        return err
    why = rounds_problem(f.parent / ROUNDS)  # the report's curves: a run without them is not finished
    return DamagedResult(f.parent, why) if why else None


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the package's Python sources: recorded with every run (not part of its key), so
    a report can tell runs made by different code apart."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- one run (in this process or a worker) ------------------------------------------------------
def execute(job: dict[str, Any], emit: Callable[[tuple], None] | None = None) -> dict[str, Any]:
    """Run one configuration into job['tmp'], then rename it to job['final']."""
    import torch

    from mhpfl.config import RunConfig
    from mhpfl.engine import run

    before = torch.get_num_threads()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    tmp, final = Path(job["tmp"]), Path(job["final"])
    shutil.rmtree(tmp, ignore_errors=True)
    idx = job["index"]

    def on_round(row: dict) -> None:
        if emit is not None:
            emit(("round", idx, int(row["round"]), float(row["mean_acc"])))

    try:
        if emit is not None:
            emit(("start", idx))
        cfg = RunConfig.from_dict(job["config"])
        summary = run(cfg, out=tmp, progress=False, on_round=on_round)
        atomic_write_json(tmp / "run.json", {"key": job["key"], "code": code_fingerprint(),
                                             "config": job["config"]})
        publish(tmp, final)
        return {"index": idx, "ok": True, "best": summary["selected_mean_acc"],
                "wall": summary["wall_seconds"]}
    except UserError as e:
        return {"index": idx, "ok": False, "error": str(e), "trace": traceback.format_exc()}
    except Exception as e:  # a method bug must not take the other runs down
        return {"index": idx, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(before)


def publish(tmp: Path, final: Path) -> None:
    """Move a complete run directory into place atomically (replacing an old one with --force:
    the old result goes only once the new one is complete)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def _worker(job: dict[str, Any], queue) -> dict[str, Any]:
    return execute(job, queue.put)


# ---- the suite ----------------------------------------------------------------------------------
@dataclass
class BenchResult:
    total: int
    cached: int
    trained: int
    failed: list[tuple[Entry, str]] = field(default_factory=list)
    wall_seconds: float = 0.0


class _Lock:
    def __init__(self, out: Path):
        self.f = open(out / ".lock", "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise UserError(f"another 'mhpfl bench' is running into {out}; wait for it or use "
                            "another --out") from None

    def release(self):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_inflight(out: Path) -> None:
    d = out / ".inflight"
    if not d.is_dir():
        return
    for p in d.iterdir():
        pid = p.name.rsplit(".", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
            shutil.rmtree(p, ignore_errors=True)
    for p in (out / "runs").glob(".*.old.*") if (out / "runs").is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def prepare_out(out: str | Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror}); choose a writable directory") from None
    return out


def check_workers(jobs: int | None, threads: int | None) -> None:
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {jobs})")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1 (got {threads})")


def plan_workers(cores: int, todo: int, jobs: int | None, threads: int | None) -> tuple[int, int]:
    """(processes, torch threads each): by default one process per core (at most one per run
    to do) with cores // jobs threads; jobs x threads is capped at the cores (no
    oversubscription: with more threads than cores, each run is slower than alone)."""
    jobs = max(1, min(cores, todo)) if jobs is None else jobs
    cap = max(1, cores // jobs)
    return jobs, cap if threads is None else min(threads, cap)


def round_work(cfg) -> int:
    """A round's work, in integer millionths of the training data (float increments summed over
    a suite overshoot a progress bar's total): the share of the data that participates in the
    round times its local epochs."""
    share = max(1, round(cfg.frac * cfg.clients)) / cfg.clients * cfg.train_fraction
    return max(1, round(1e6 * share * cfg.local_epochs))


def longest_first(todo: list[Entry]) -> list[Entry]:
    """Runs in the order they start: the most work (rounds x round_work) first; among equals the
    methods take turns (every method's first such run, then every method's second: seed 0 of each
    method, then seed 1, ...), suite order otherwise. A long run started last would keep one worker
    busy alone at the end. Taking turns matters because methods differ several-fold in cost per
    round (FedKD trains two models), which `round_work` does not know: in the suite's own order the
    first runs are all one method's, so the ETA's rate is that method's (quick's 30 runs measured
    on 2 AVX2 cores, replayed by benchmarks/eta_replay.py: the first ETA said 31 min left for 45,
    the mean error was 6.9 min; taking turns, 40 for 45 and 2.8 min), and a suite stopped early
    has the first seeds of every method rather than all of a few."""
    def work(e: Entry) -> int:
        return e.cfg.rounds * round_work(e.cfg)

    turn, taken = [], Counter()
    for e in todo:
        turn.append(taken[e.method, work(e)])
        taken[e.method, work(e)] += 1
    order = sorted(range(len(todo)), key=lambda i: (-work(todo[i]), turn[i]))
    return [todo[i] for i in order]


def run_suite(suite: Suite, out: str | Path, *, force: bool = False, jobs: int | None = 1,
              threads: int | None = None, progress: bool = True,
              log: Callable[[str], None] = print, executor: str = "local",
              ray: "RayOptions | None" = None) -> BenchResult:
    """Run every run of `suite` not already finished in `out` (all of them with force).
    `jobs`: processes (None: one per available core, see plan_workers; the CLI's default);
    `threads`: torch threads per run (default cores // jobs, never more).
    `executor`: "local" (processes on this machine, `jobs` of them) or "ray" (Ray tasks,
    see mhpfl.benchmark.ray_executor; `ray` holds its options; threads default to its run_cpus)."""
    if executor not in ("local", "ray"):
        raise UserError(f"unknown --executor '{executor}'; choose local or ray")
    if executor == "ray" and ray is None:
        from mhpfl.benchmark.ray_executor import RayOptions

        ray = RayOptions()
    check_workers(jobs, threads)
    out = prepare_out(out)
    lock = _Lock(out)
    try:
        _clean_inflight(out)
        atomic_write_json(out / "suite.json", suite.plan())
        atomic_write_text(out / "suite.toml", suite.text)
        runs = suite.runs()
        for e in runs.values():
            bad = damaged(out, e)
            if bad is not None:
                log(f"  {e.run_id}: damaged result {bad.path} ({bad.why}); running it again")
        todo = longest_first([e for e in runs.values() if force or not finished(out, e)])
        if executor == "local":
            from mhpfl.methods import _REGISTERED

            if jobs is None and any(e.method in _REGISTERED for e in todo):
                jobs = 1  # a method registered in this process only is invisible to worker processes
            jobs, threads = plan_workers(_available_cores(), len(todo), jobs, threads)
        else:
            jobs = jobs or 1
        res = BenchResult(total=len(runs), cached=len(runs) - len(todo), trained=0)
        log(f"suite {suite.name}: {len(runs)} runs, {res.cached} already finished in {out}, "
            f"{len(todo)} to run" + (f" with {jobs} jobs" if todo and jobs > 1 else ""))
        for s in suite.settings:
            if s.skipped:
                log(f"  setting {s.name}: skipping {', '.join(s.skipped)} (not for the {s.cfg.zoo} zoo)")
        if not todo:
            return res
        t0, started = time.perf_counter(), _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        if executor == "ray" and threads is None:
            threads = max(1, int(ray.run_cpus))
        pid = os.getpid()
        jobs_spec = [{"index": i, "key": e.key, "config": e.cfg.to_dict(), "threads": threads,
                      "tmp": str(out / ".inflight" / f"{run_dirname(e)}.{pid}"),
                      "final": str(out / "runs" / run_dirname(e))} for i, e in enumerate(todo)]
        bar = _Progress(todo, enabled=progress, log=log)
        where: dict[str, Any] = {}
        try:
            if executor == "ray":
                from mhpfl.benchmark.ray_executor import execute_ray

                results, where = execute_ray(jobs_spec, ray, todo[0].cfg.device,
                                             {e.method for e in todo}, bar, bar.write)
            else:
                results = _execute_all(jobs_spec, jobs, bar)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (mhpfl.cli): the finished runs stay
            for j in jobs_spec:
                shutil.rmtree(j["tmp"], ignore_errors=True)
            done = sum(finished(out, x) for x in runs.values())
            stop = Interrupted.of(e, f"{done} of the suite's {len(runs)} runs are finished in {out / 'runs'} "
                                     f"(the runs in flight were stopped); rerun the same command to train "
                                     f"the other {len(runs) - done}")
            res.trained, res.wall_seconds = bar.ok, round(time.perf_counter() - t0, 1)
            if res.trained:  # the runs it finished are in the folder: so is the machine they ran on
                _record_session(out, suite, started, res, jobs, todo[0].cfg.device,
                                {"executor": executor, "interrupted": signal.Signals(stop.signum).name})
            raise stop from None
        finally:
            bar.close()
        for r in results:
            e = todo[r["index"]]
            fail = out / "failed" / f"{run_dirname(e)}.txt"
            if r["ok"]:
                res.trained += 1
                fail.unlink(missing_ok=True)
            else:
                res.failed.append((e, r["error"]))
                node = f"on {r['node']['host']} ({r['node']['ip']})\n" if r.get("node") else ""
                atomic_write_text(fail, f"{e.run_id}\n{node}{r['error']}\n\n{r.get('trace', '')}")
        res.wall_seconds = round(time.perf_counter() - t0, 1)
        if where:
            for p in where["placement"]:
                p["run"] = todo[p.pop("index")].run_id
        if res.trained:
            _record_session(out, suite, started, res, jobs, todo[0].cfg.device, where)
        return res
    finally:
        lock.release()


def _record_session(out: Path, suite: Suite, started: str, res: BenchResult, jobs: int, device: str,
                    where: dict[str, Any] | None = None) -> None:
    import json

    f = out / "bench.json"
    try:
        sessions = json.loads(f.read_text())["sessions"] if f.is_file() else []
    except (ValueError, KeyError):
        sessions = []
    sessions.append({"suite": suite.name, "started": started, "wall_seconds": res.wall_seconds,
                     "runs_trained": res.trained, "runs_failed": len(res.failed), "runs_cached": res.cached,
                     "jobs": jobs, "code": code_fingerprint(), "machine": machine_info(device),
                     **(where or {"executor": "local"})})
    atomic_write_json(f, {"sessions": sessions})


def _execute_all(jobs_spec: list[dict], jobs: int, bar: "_Progress") -> list[dict]:
    if jobs == 1:
        results = []
        for j in jobs_spec:
            r = execute(j, bar.event)
            bar.done(r)
            results.append(r)
        return results
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # fork after torch started its thread pools can deadlock
    with ctx.Manager() as manager:
        q = manager.Queue()
        ex = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
        try:
            pending = {ex.submit(_worker, j, q) for j in jobs_spec}
            results = []
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        bar.event(q.get_nowait())
                    except _queue.Empty:
                        break
                for fut in done:
                    r = fut.result()
                    bar.done(r)
                    results.append(r)
            return sorted(results, key=lambda r: r["index"])
        except BaseException:  # Ctrl-C, SIGTERM: stop the runs in flight too, not only the queue
            _stop_workers(ex)
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            ex.shutdown(wait=True)


def _stop_workers(ex) -> None:
    """Terminate a ProcessPoolExecutor's workers (a signal sent to this process alone, such as
    `timeout`'s SIGTERM, never reaches them; shutdown would wait for their runs to end). Before
    shutdown, which forgets them."""
    stop = getattr(ex, "terminate_workers", None)  # Python >= 3.14
    if stop is not None:
        stop()
        return
    for p in list((getattr(ex, "_processes", None) or {}).values()):
        if p.is_alive():
            p.terminate()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class _Progress:
    """One bar for the whole suite (work-weighted, with ETA) naming the runs in flight and their
    round; a line per finished run."""

    def __init__(self, todo: list[Entry], enabled: bool, log: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.todo, self.log, self.n, self.clock = todo, log, len(todo), clock  # or a replay's fake clock
        self.t0 = clock()
        self.unit = [round_work(e.cfg) for e in todo]
        self.seen = [0] * self.n
        self.active: dict[int, int] = {}
        self.finished = self.ok = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            total = sum(u * e.cfg.rounds for u, e in zip(self.unit, todo))
            self.bar = tqdm(total=total, bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
                            desc=f"runs 0/{self.n}", dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left: elapsed time x work left / work done (work: `round_work` x rounds)."""
        done = sum(u * s for u, s in zip(self.unit, self.seen))
        left = sum(u * e.cfg.rounds for u, e in zip(self.unit, self.todo)) - done
        if done <= 0 or self.finished >= self.n:
            return None
        return (self.clock() - self.t0) * left / done

    def _name(self, i: int) -> str:
        e = self.todo[i]
        extra = "" if e.group == "main" else f" {e.group.split(':', 1)[1]}={e.value}"
        return f"{e.method}{extra} {e.setting} s{e.seed}"

    def event(self, ev: tuple) -> None:
        kind, i = ev[0], ev[1]
        if kind == "start":
            self.active[i] = 0
        elif kind == "round":
            r = ev[2]
            self.active[i] = r
            if r > self.seen[i]:
                if self.bar is not None:
                    self.bar.update(self.unit[i] * (r - self.seen[i]))
                self.seen[i] = r
        self._refresh()

    def _refresh(self) -> None:
        if self.bar is None:
            return
        running = "; ".join(f"[{i + 1}/{self.n}] {self._name(i)} round {r}/{self.todo[i].cfg.rounds}"
                            for i, r in sorted(self.active.items()))
        self.bar.set_description_str(f"runs {self.finished}/{self.n}", refresh=False)
        self.bar.set_postfix_str(running, refresh=True)

    def done(self, r: dict) -> None:
        i = r["index"]
        self.active.pop(i, None)
        self.finished += 1
        self.ok += bool(r["ok"])
        e = self.todo[i]
        if e.cfg.rounds > self.seen[i]:
            if self.bar is not None:
                self.bar.update(self.unit[i] * (e.cfg.rounds - self.seen[i]))
            self.seen[i] = e.cfg.rounds
        host = f" on {r['node']['host']}" if r.get("node") else ""
        msg = (f"[{self.finished}/{self.n}] {self._name(i)}: acc {r['best']:.2f}% ({r['wall']:.0f} s{host})"
               if r["ok"] else f"[{self.finished}/{self.n}] {self._name(i)}: FAILED{host}: {r['error']}")
        eta = self.eta()
        if eta is not None:
            msg += f"; ETA {_clock(eta)}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.log(msg)
        self._refresh()

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.log(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
