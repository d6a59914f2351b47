"""A whole suite's device-hours from what benchmarks/paper_cost.py measured, every figure derived
by this script from the measurement files (none typed in by hand):

    python benchmarks/suite_hours.py docs/measurements/gpu-h200-2026-12-04/cifar10_n10.json \
        docs/measurements/gpu-h200-2026-12-04/cifar10_n10_ieee.json \
        docs/measurements/gpu-h200-2026-12-04/paper_suite.json --as-standalone fedavg

Each run of the suite (every seed, every ablation value) is priced at its rounds x the
device-seconds per round of its (setting, method): the s/round measured, divided by --copies
where that many runs shared the device (paper_cost.py --copies):
- measured: that pair's own row (where files measured a pair twice, the later file's row counts);
- projected: Standalone's measured s/round in the run's setting x the method's ratio to Standalone
  in the nearest setting where both were measured (the same number of clients first, then the
  same dataset, then the same zoo, then the suite's order);
- as Standalone: a method measured in no setting and named by --as-standalone (FedAvg, say: it
  trains what Standalone trains, plus one average) is priced at Standalone's s/round;
- not priced: Standalone was not measured in the run's setting, or the method nowhere (and not
  named by --as-standalone).
With --copies K > 1, a pair measured with K runs at once is priced so (measured); any other is
priced as one run alone (measured, projected or as Standalone, from the rows of one run at a
time, as above) x Standalone's K-at-once factor (device-seconds of a round with K at once / alone,
both from one file: paper_cost.py --copies 1 K measures them in one call) in the nearest setting
where Standalone was measured both ways (shared): an extrapolation that assumes every method
shares the device as Standalone did; not priced where no such setting exists.
An ablation run is priced as its setting's main run of the method (paper_cost.py does the same).
The files must come from one suite, device, GPU, CPU and torch thread count.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

IDENTITY = ("suite", "device", "gpu", "cpu", "torch_threads")


def load_reports(paths: list[str]) -> tuple[dict, list[dict]]:
    """The files' common identity (IDENTITY's fields) and their rows, in the order given."""
    reports = []
    for p in paths:
        try:
            reports.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {p}: not a paper_cost.py report ({e}); give the --out files it wrote")
    ident = {k: reports[0].get(k) for k in IDENTITY}
    for p, r in zip(paths[1:], reports[1:]):
        other = {k: r.get(k) for k in IDENTITY}
        if other != ident:
            diff = ", ".join(f"{k} {ident[k]!r} vs {other[k]!r}" for k in IDENTITY if other[k] != ident[k])
            raise SystemExit(f"error: {p} and {paths[0]} differ in {diff}; give the files of one suite "
                             f"measured on one machine")
    return ident, [dict(row, file=i) for i, r in enumerate(reports) for row in r["rows"]]


def suite_hours(suite, rows: list[dict], precision: str = "fp32", batching: str = "off",
                as_standalone: tuple[str, ...] = (), copies: int = 1) -> pd.DataFrame:
    """One row per (setting, method) of `suite`: its runs, their rounds, the s/round they are
    priced at (device-seconds), on what basis, and the hours (rounds x that / 3600; NaN where not
    priced), for `copies` runs sharing the device (see the module's text)."""
    measured = _device_seconds(rows, precision, batching, copies)
    alone = _device_seconds(rows, precision, batching, 1) if copies > 1 else measured
    factors = {}  # setting -> Standalone's device-seconds with `copies` at once / alone, from one file
    if copies > 1:
        by_file = {(r.get("file"), r["setting"]): r for r in _rows(rows, precision, batching, 1)
                   if r["method"] == "standalone"}
        for r in _rows(rows, precision, batching, copies):
            if r["method"] == "standalone" and (r.get("file"), r["setting"]) in by_file:
                factors[r["setting"]] = r["s_per_round"] / copies / by_file[r.get("file"), r["setting"]]["s_per_round"]
    settings = {s.name: (i, s.cfg) for i, s in enumerate(suite.settings)}
    pairs: dict[tuple[str, str], list[int]] = {}
    for e in suite.runs().values():
        p = pairs.setdefault((e.setting, e.method), [0, 0])
        p[0] += 1
        p[1] += e.cfg.rounds
    out = []
    for (setting, method), (runs, rounds) in pairs.items():
        if copies == 1 or (setting, method) in measured:
            s, basis = _price(setting, method, measured, settings, as_standalone)
        else:
            s, basis = _price(setting, method, alone, settings, as_standalone)
            ref = _nearest(setting, [r for r in settings if r in factors], settings)
            if s is not None and ref is None:
                s, basis = None, f"not priced: Standalone measured alone and {copies} at once in no setting"
            elif s is not None:
                f = factors[ref]
                s, basis = s * f, f"shared: {basis} x {f:.2f} (Standalone's {copies}-at-once factor in {ref})"
        out.append({"setting": setting, "method": method, "runs": runs, "rounds": rounds,
                    "s_per_round": None if s is None else round(s, 3), "basis": basis,
                    "hours": None if s is None else s * rounds / 3600})
    return pd.DataFrame(out)


def _rows(rows: list[dict], precision: str, batching: str, copies: int) -> list[dict]:
    return [r for r in rows if (r["precision"], r["batch_clients"], r.get("copies", 1)) == (precision, batching, copies)]


def _device_seconds(rows: list[dict], precision: str, batching: str, copies: int) -> dict:
    """(setting, method) -> device-seconds of a round, from the rows measured with `copies` runs at
    once (later rows win)."""
    return {(r["setting"], r["method"]): r["s_per_round"] / copies for r in _rows(rows, precision, batching, copies)}


def _price(setting: str, method: str, measured: dict, settings: dict,
           as_standalone: tuple[str, ...]) -> tuple[float | None, str]:
    """A pair's device-seconds per round from `measured`, and on what basis."""
    s, alone = measured.get((setting, method)), measured.get((setting, "standalone"))
    if s is not None:
        return s, "measured"
    if alone is None:
        return None, "not priced: Standalone not measured in this setting"
    ref = _nearest_reference(setting, method, measured, settings)
    if ref is None and method in as_standalone:
        return alone, "as Standalone: the method was measured in no setting"
    if ref is None:
        return None, "not priced: the method was measured in no setting"
    ratio = measured[(ref, method)] / measured[(ref, "standalone")]
    return alone * ratio, f"projected: Standalone's x {ratio:.2f} (the ratio in {ref})"


def _nearest_reference(setting: str, method: str, measured: dict, settings: dict) -> str | None:
    refs = [r for r in settings if (r, method) in measured and (r, "standalone") in measured]
    return _nearest(setting, refs, settings)


def _nearest(setting: str, refs: list[str], settings: dict) -> str | None:
    """The setting of `refs` nearest to `setting`: the same number of clients first, then the same
    dataset, then the same zoo, then the suite's order."""
    _, cfg = settings[setting]
    return min(refs, key=lambda r: (abs(settings[r][1].clients - cfg.clients), settings[r][1].dataset != cfg.dataset,
                                    settings[r][1].zoo != cfg.zoo, settings[r][0]), default=None)


def totals(table: pd.DataFrame) -> dict:
    """Runs and hours by basis (measured, projected, as Standalone, not priced) and in all (the
    suite's hours, None where some of its runs are not priced)."""
    kind = table["basis"].str.split(":").str[0]
    out = {k: {"runs": int(g["runs"].sum()), "hours": None if k == "not priced" else round(float(g["hours"].sum()), 1)}
           for k, g in table.groupby(kind, sort=False)}
    whole = None if "not priced" in out else round(float(table["hours"].sum()), 1)
    out["all"] = {"runs": int(table["runs"].sum()), "hours": whole}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="paper_cost.py --out files, of one machine")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-clients", default="off", choices=["off", "on"])
    ap.add_argument("--copies", type=int, default=1,
                    help="price K runs sharing the device: the rows measured with K at once, the rest "
                         "extrapolated with Standalone's K-at-once factor (see above)")
    ap.add_argument("--as-standalone", nargs="+", default=[], metavar="METHOD",
                    help="methods measured nowhere to price at Standalone's s/round (else not priced)")
    ap.add_argument("--out", default=None, help="also write the table and totals here (JSON)")
    a = ap.parse_args()
    from mhpfl.benchmark.suite import load_suite

    ident, rows = load_reports(a.files)
    table = suite_hours(load_suite(ident["suite"]), rows, a.precision, a.batch_clients, tuple(a.as_standalone),
                        a.copies)
    t = totals(table)
    by_setting = table.assign(measured=table["runs"].where(table["basis"] == "measured", 0)).groupby(
        "setting", sort=False).agg(runs=("runs", "sum"), measured=("measured", "sum"),
                                   hours=("hours", lambda h: h.sum(min_count=len(h))))  # None if one is not priced
    print(by_setting.to_markdown(floatfmt=("", ".0f", ".0f", ".1f")))
    where = ident["device"] + (f" ({ident['gpu']})" if ident["gpu"] else "")
    print(f"{ident['suite']} suite, {a.precision}, batch-clients {a.batch_clients}, {a.copies} run(s) at once, "
          f"{where}, {ident['torch_threads']} torch thread(s): " + "; ".join(
              f"{k} {v['runs']} runs, " + ("no figure" if v["hours"] is None else f"{v['hours']} h")
              for k, v in t.items()))
    if a.out:
        pairs = table.astype(object).where(table.notna(), None).to_dict("records")
        Path(a.out).write_text(json.dumps({**ident, "precision": a.precision, "batch_clients": a.batch_clients,
                                           "copies": a.copies, "totals": t, "pairs": pairs}, indent=1))


if __name__ == "__main__":
    main()
