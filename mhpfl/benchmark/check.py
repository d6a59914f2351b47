"""The regression check: rerun a small suite, compare with a committed reference.

`mhpfl check` always reruns every run of the suite (into a fresh temporary folder unless --out
is given, and then with --force): a cache keyed on configuration and method version could not
see a code change that forgot to bump a version, so the check never trusts one.

Compared per run (id = setting|method|seed): validation-selected, best and final mean accuracy within an absolute
tolerance (points; default 2, or the reference's / suite's per-method tolerance), bytes up,
bytes down and client training FLOPs exactly (or within a per-method relative tolerance,
`bytes_rel_tolerance`, for methods whose message sizes depend on the data). A run missing on
either side, or a failed run, is a failure too. `--update` rewrites the reference.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mhpfl.benchmark.runner import code_fingerprint, machine_info, run_dirname, run_suite
from mhpfl.benchmark.suite import Suite
from mhpfl.errors import Interrupted, UserError
from mhpfl.io import atomic_write_json
from mhpfl.results import is_number, load_summary

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_SUITE = "smoke"
DEFAULT_REFERENCE = "results/smoke/reference.json"
ACC_METRICS = ("selected_mean_acc", "best_mean_acc", "final_mean_acc")
EXACT_METRICS = ("bytes_up", "bytes_down", "train_flops")


def repository_root() -> Path | None:
    """The source checkout this package runs from (an editable install), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        return root if 'name = "mhpfl-bench"' in (root / "pyproject.toml").read_text() else None
    except OSError:
        return None


def locate_reference(update: bool = False, cwd: Path | None = None) -> Path:
    """The default reference, wherever `mhpfl check` is started: DEFAULT_REFERENCE under the
    working directory or one of its parents, else under the checkout the package runs from.
    With `update` and none found, where a new one goes (the checkout's); else a UserError."""
    cwd = (cwd or Path.cwd()).resolve()
    repo = repository_root()
    for d in [cwd, *cwd.parents, *([repo] if repo else [])]:
        if (d / DEFAULT_REFERENCE).is_file():
            return d / DEFAULT_REFERENCE
    if update and repo is not None:
        return repo / DEFAULT_REFERENCE
    raise UserError(f"no {DEFAULT_REFERENCE} in {cwd}, its parents"
                    f"{f' or the checkout {repo}' if repo else ''}; start 'mhpfl check' at the repository "
                    "root or pass --reference PATH (a new one: --reference PATH --update)")


def read_reference(path: Path, suite: Suite) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ref = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON; restore it from git or run 'mhpfl check --update'") from None
    if not isinstance(ref, dict) or "suite" not in ref or "runs" not in ref:
        raise UserError(f"{path} is not a reference written by 'mhpfl check --update'; pass the right --reference")
    if ref["suite"] != suite.name:
        raise UserError(f"reference {path} was made by suite '{ref['suite']}', not '{suite.name}'; pass "
                        f"--reference for suite '{suite.name}' or rewrite it with 'mhpfl check --update'")
    why = _reference_problem(ref)
    if why:
        raise UserError(f"{path} is damaged ({why}); restore it from git or run 'mhpfl check --update'")
    return ref


def _reference_problem(ref: dict[str, Any]) -> str | None:
    """What in a reference's numbers the comparison could not use, or None."""
    def number(v):
        return is_number(v) and math.isfinite(v)

    def numbers(d):
        return isinstance(d, dict) and all(number(v) for v in d.values())

    tol = ref.get("tolerance", {})
    if not (isinstance(tol, dict) and number(tol.get("default", 0)) and numbers(tol.get("per_method", {}))):
        return "tolerance is not {default: number, per_method: {method: number}}"
    if not numbers(ref.get("bytes_rel_tolerance", {})):
        return "bytes_rel_tolerance is not {method: number}"
    if not isinstance(ref["runs"], dict):
        return "runs is not an object of run id -> numbers"
    for rid, r in ref["runs"].items():
        # a metric the reference lacks (one added since it was written) is a failure row in the
        # comparison, which says to --update; a metric that is there must be a number
        if not (isinstance(r, dict) and isinstance(r.get("method"), str)
                and all(number(r[m]) for m in ACC_METRICS if m in r)
                and all(number(r[m]) and float(r[m]).is_integer() for m in EXACT_METRICS if m in r)):
            return f"run {rid}'s method, accuracies or bytes and FLOPs are not a name and numbers"
    return None


def collect(suite: Suite, out: Path) -> dict[str, dict[str, Any]]:
    got = {}
    for e in suite.entries:
        f = out / "runs" / run_dirname(e) / "summary.json"
        if not f.is_file():
            continue
        s = load_summary(f)
        got[e.run_id] = {"method": e.method, "key": e.key,
                         **{m: float(s[m]) for m in ACC_METRICS}, **{m: int(s[m]) for m in EXACT_METRICS}}
    return got


def compare(ref_runs: dict[str, dict], now: dict[str, dict], failed: dict[str, str], *, default_tol: float,
            tol_per_method: dict[str, float], bytes_rel: dict[str, float]) -> tuple[pd.DataFrame, bool]:
    """Rows for everything that moved at all; second value: True if any is a failure."""
    import pandas as pd

    rows, bad = [], False
    for rid in sorted(set(ref_runs) | set(now) | set(failed)):
        r, n = ref_runs.get(rid), now.get(rid)
        if rid in failed:
            rows.append([rid, "run", "", "", "", "", f"FAIL: run failed ({failed[rid]})"])
            bad = True
            continue
        if r is None:
            rows.append([rid, "run", "", "", "", "", "FAIL: not in the reference (run 'mhpfl check --update')"])
            bad = True
            continue
        if n is None:
            rows.append([rid, "run", "", "", "", "", "FAIL: in the reference, not in the suite"])
            bad = True
            continue
        m = n["method"]
        tol = tol_per_method.get(m, default_tol)
        missing = [k for k in (*ACC_METRICS, *EXACT_METRICS) if k not in r]
        if missing:  # a reference written before these metrics existed
            rows.append([rid, ", ".join(missing), "", "", "", "",
                         "FAIL: not in the reference (run 'mhpfl check --update')"])
            bad = True
            continue
        for k in ACC_METRICS:
            d = n[k] - r[k]
            if d == 0:
                continue
            ok = abs(d) <= tol + 1e-9
            bad |= not ok
            rows.append([rid, k, f"{r[k]:.2f}", f"{n[k]:.2f}", f"{d:+.2f}", f"±{tol:g} pts",
                         "within tolerance" if ok else "FAIL: accuracy moved beyond tolerance"])
        for k in EXACT_METRICS:
            d = n[k] - r[k]
            if d == 0:
                continue
            rel = bytes_rel.get(m, 0.0) if k.startswith("bytes") else 0.0
            ok = abs(d) <= rel * abs(r[k])
            bad |= not ok
            rows.append([rid, k, f"{r[k]:,}", f"{n[k]:,}", f"{d:+,}", "exact" if rel == 0 else f"±{rel:.1%}",
                         "within tolerance" if ok else f"FAIL: {k.replace('_', ' ')} changed"])
    df = pd.DataFrame(rows, columns=["run", "metric", "reference", "now", "change", "allowed", "status"])
    return df, bad


def run_check(suite: Suite, reference: str | Path = DEFAULT_REFERENCE, *, update: bool = False,
              tolerance: float | None = None, jobs: int | None = 1, threads: int | None = None, out: str | Path | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> int:
    """Rerun `suite` and compare with `reference`; 0 when nothing regressed (or after --update)."""
    import pandas as pd

    reference = Path(reference)
    if reference.is_dir():
        raise UserError(f"--reference {reference} is a folder; pass the reference's file, e.g. "
                        f"{reference / Path(DEFAULT_REFERENCE).name}")
    ref = read_reference(reference, suite)  # a wrong reference fails before any training
    if ref is None and not update:
        raise UserError(f"no reference at {reference}; create it with 'mhpfl check --update' "
                        "(or pass --reference PATH)")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a finite number >= 0 (got {tolerance})")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mhpfl-check-")
        out = tmp.name
    try:
        res = run_suite(suite, out, force=True, jobs=jobs, threads=threads, progress=progress, log=log)
        now = collect(suite, Path(out))
    except Interrupted as e:  # the check reruns every run each time: nothing of this one is reused
        raise Interrupted.of(e, "the check stopped before comparing anything (the reference is "
                                "unchanged); rerun it") from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    failed = {e2.run_id: msg for e, msg in res.failed for e2 in suite.entries if e2.key == e.key}
    ref_tol = (ref or {}).get("tolerance", {})
    default_tol = (tolerance if tolerance is not None
                   else float(ref_tol.get("default", suite.check["tolerance"])))
    tol_pm = {**suite.check["tolerance_per_method"], **ref_tol.get("per_method", {})}
    bytes_rel = {**suite.check["bytes_rel_tolerance"], **(ref or {}).get("bytes_rel_tolerance", {})}
    if ref is not None:
        df, bad = compare(ref["runs"], now, failed, default_tol=default_tol, tol_per_method=tol_pm,
                          bytes_rel=bytes_rel)
    else:
        df, bad = pd.DataFrame(), False
    if update:
        if failed:
            raise UserError(f"{len(failed)} run(s) failed ({next(iter(failed.values()))}); fix them "
                            "before 'mhpfl check --update'")
        if not df.empty:
            log("changes against the old reference:\n" + df.to_markdown(index=False))
        atomic_write_json(reference, {
            "suite": suite.name, "source": suite.source,
            "tolerance": {"default": float(ref_tol.get("default", suite.check["tolerance"])),
                          "per_method": tol_pm},
            "bytes_rel_tolerance": bytes_rel,
            "written_by": {"code": code_fingerprint(), "machine": machine_info(suite.entries[0].cfg.device)},
            "runs": now})
        log(f"reference {reference} rewritten: {len(now)} runs of suite {suite.name}")
        return 0
    if not df.empty:
        log(df.to_markdown(index=False))
    n_fail = int(df["status"].str.startswith("FAIL").sum()) if not df.empty else 0
    if bad:
        log(f"check FAILED: {n_fail} change(s) beyond tolerance against {reference}; if the change is "
            "intended, bump the method's version and run 'mhpfl check --update'")
        return 1
    log(f"check passed: {len(now)} runs of suite {suite.name} match {reference} (accuracy within "
        f"±{default_tol:g} points{' or per-method tolerance' if tol_pm else ''}, bytes and FLOPs "
        f"{'exact' if not bytes_rel else 'exact or within their tolerance'}); {len(df)} within-tolerance move(s)")
    return 0
