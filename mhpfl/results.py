"""Reading a finished run's `summary.json` and `rounds.csv`: the one place their schema is checked.

A summary is trusted only if it parses as a JSON object and carries every field in
`REQUIRED_FIELDS`, those in `FIELD_TYPES` with their types; a run's rounds.csv only if it has
`ROUNDS_COLUMNS` and whole rows (`rounds_problem`). `mhpfl bench` (whether a cached run is
finished), `mhpfl report`, `mhpfl compare` and `mhpfl check` all read summaries through
`load_summary`, so a damaged or truncated file (a full disk, a partial copy or sync, a hand
edit) is named by path in a one-line error instead of a traceback, and bench reruns it instead
of trusting it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mhpfl.errors import UserError

SUMMARY = "summary.json"
ROUNDS = "rounds.csv"
ROUNDS_COLUMNS = ("round", "mean_acc", "train_flops", "cum_train_flops", "cum_bytes_up", "cum_bytes_down")

# How a run's reported round was chosen (the summary's "selection"): the rounds >= 1 with the best
# mean validation accuracy, or, where no client holds validation data, the final round.
SELECTED_ON_VALIDATION = "best mean validation accuracy"
SELECTED_FINAL_ROUND = "final round (no validation data)"

# Fields the consumers of a summary rely on (the engine writes more): compare and check read
# the first nine, the report the rest too.
REQUIRED_FIELDS: tuple[str, ...] = (
    "method", "config", "best_mean_acc", "final_mean_acc", "bytes_up", "bytes_down", "train_flops",
    "rounds_run", "wall_seconds",
    "selected_mean_acc", "selected_weighted_acc", "selected_mean_acc_participated", "selected_round",
    "converged", "never_participated", "final_std_acc", "per_client_selected_acc",
)


class DamagedResult(UserError):
    """A summary.json that exists but cannot be trusted (unparsable or missing fields)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is damaged ({why}); delete its run folder and rerun it "
                         "(mhpfl bench reruns damaged runs by itself)")
        self.path, self.why = path, why


def load_summary(path: str | Path) -> dict[str, Any]:
    """The summary at `path` (a summary.json or a run folder holding one), checked against
    REQUIRED_FIELDS. Raises UserError naming the file if it is absent or damaged."""
    path = Path(path)
    if path.is_dir() or path.name != SUMMARY:
        path = path / SUMMARY
    if path.parent.is_file():
        raise UserError(f"{path.parent} is a file, not a run folder (one holding {SUMMARY}); pass the "
                        "run's folder")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path} not found: the run in {path.parent} has not finished "
                        f"(run 'mhpfl run ... --out {path.parent}' first)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedResult(path, f"unreadable: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    try:
        s = json.loads(text)
    except ValueError as e:
        raise DamagedResult(path, f"not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(s, dict):
        raise DamagedResult(path, f"expected a JSON object, found {type(s).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in s]
    if missing:
        raise DamagedResult(path, f"missing field(s) {', '.join(missing)}")
    if not isinstance(s["config"], dict) or not isinstance(s["config"].get("method_options", {}), dict):
        raise DamagedResult(path, "field config (or its method_options) is not an object")
    for field, (ok, kind) in FIELD_TYPES.items():
        if not ok(s[field]):
            raise DamagedResult(path, f"field {field} is {json.dumps(s[field])[:40]}, not {kind}")
    return s


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What the consumers compute with (None where the engine writes it for a run that has no value).
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "method": (lambda v: isinstance(v, str), "a string"),
    **{f: (is_number, "a number") for f in ("final_mean_acc", "selected_mean_acc", "selected_weighted_acc",
                                         "final_std_acc", "wall_seconds", "train_flops")},
    **{f: (lambda v: v is None or is_number(v), "a number or null")
       for f in ("best_mean_acc", "selected_mean_acc_participated")},
    **{f: (_whole, "a whole number") for f in ("bytes_up", "bytes_down", "rounds_run",
                                              "selected_round", "never_participated")},
    "converged": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "per_client_selected_acc": (lambda v: isinstance(v, list), "a list"),
}


def rounds_problem(path: str | Path) -> str | None:
    """Why a finished run's rounds.csv (the report's curves) cannot be used, or None: unreadable,
    a header without ROUNDS_COLUMNS, no rounds, or a row cut short (a truncated copy)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"{ROUNDS} unreadable: {getattr(e, 'strerror', None) or type(e).__name__}"
    lacking = [c for c in ROUNDS_COLUMNS if not rows or c not in rows[0]]
    if lacking:
        return f"{ROUNDS} lacks column(s) {', '.join(lacking)}"
    if len(rows) < 2 or any(len(r) != len(rows[0]) for r in rows[1:]):
        return f"{ROUNDS} has no rounds or a row cut short"
    return None


def summary_state(run_dir: str | Path) -> str:
    """'finished' (a trustworthy summary), 'absent' (none) or 'damaged'."""
    try:
        load_summary(Path(run_dir) / SUMMARY)
    except DamagedResult:
        return "damaged"
    except UserError:
        return "absent"
    return "finished"
