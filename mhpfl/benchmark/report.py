"""The report of a suite's output folder: tables, plots and a README.

Definitions (also written into the files; the engine's protocol is in mhpfl/engine/runner.py):
- accuracy of a run (the main tables): the mean personalized test accuracy over ALL clients at
  the round with the best mean validation accuracy; further views: the sample-weighted
  accuracy, the mean over clients that participated at least once (both at that round), the
  best mean test accuracy over rounds (the paper's, optimistic) and the final round's. Cells
  are the mean ± sample std over seeds; a cell is marked when a seed's run did not converge (‡)
  or its convergence could not be judged (§; a run without validation data is also reported at
  its final round, and the caption says so).
- methods that use data beyond the clients' own (FedMD's labelled public pool) are marked; the
  headline compares pFedLoRA with the best baseline that uses no extra data, and with each
  baseline through a paired 95% t-interval over seeds.
- per-round costs are per *participating client*: (total client training FLOPs, set-up at a
  client's first participation included) / (rounds x participants per round); bytes up
  (client -> server) and down likewise.
- target accuracy of a setting: `target` of the setting, else [report] target, else the lowest
  best accuracy among the methods compared (on the seed-averaged curves, rounds >= 1), so all
  reach it. Rounds / FLOPs / bytes to target: first evaluated round >= 1 at which the
  seed-averaged mean test accuracy reaches the target, and the cumulative client FLOPs (set-up
  included) and bytes (up + down, all clients) at that round; round 0 (before any training)
  never counts. With eval_every > 1, rounds are rounded up to an evaluation.
Re-running the report on the same runs rewrites identical tables (no timestamps in them).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mhpfl.errors import UserError
from mhpfl.io import atomic_write_text
from mhpfl.results import ROUNDS, SELECTED_FINAL_ROUND, is_number, load_summary, rounds_problem

PAPER = {"acc": 1.35, "comp": 11.81, "comm": 7.41}
# accuracy views of a run: column -> (summary field, what it is)
ACC_VIEWS = {
    "acc": ("selected_mean_acc", "mean test accuracy over all clients at the round with the best mean validation accuracy"),
    "weighted_acc": ("selected_weighted_acc", "sample-weighted test accuracy (sum correct / sum samples over all "
                                              "clients) at the round with the best mean validation accuracy"),
    "acc_participated": ("selected_mean_acc_participated", "mean test accuracy over the clients that had participated "
                                                           "at least once, at the round with the best mean validation accuracy"),
    "best_acc": ("best_mean_acc", "best mean test accuracy over rounds >= 1 (the paper's protocol: selected on test, optimistic)"),
    "final_acc": ("final_mean_acc", "mean test accuracy over all clients at the last round"),
}
DAGGER, UNCONVERGED, NOT_JUDGED = "†", "‡", "§"
SELECTED_VIEWS = ("acc", "weighted_acc", "acc_participated")  # the views at the selected round
DISPLAY = {"standalone": "Standalone", "fedavg": "FedAvg", "fedmd": "FedMD", "fedkd": "FedKD",
           "fml": "FML", "lgfedavg": "LG-FedAvg", "fd": "FD", "fedproto": "FedProto", "pfedlora": "pFedLoRA",
           "fedgh": "FedGH", "fedtgp": "FedTGP"}
DASH = "—"


def disp(m: str) -> str:
    return DISPLAY.get(m, m)


# ---- loading ------------------------------------------------------------------------------------
@dataclass
class Results:
    out: Path
    plan: dict[str, Any]
    runs: pd.DataFrame  # one row per plan entry whose run finished
    curves: dict[str, pd.DataFrame]  # run key -> rounds.csv
    missing: list[str]  # run ids planned but not finished


def load(out: str | Path) -> Results:
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; run 'mhpfl bench SUITE --out {out}' first")
    plan_f = out / "suite.json"
    if not plan_f.is_file():
        raise UserError(f"{out} has no suite.json (no finished runs of a suite); run "
                        f"'mhpfl bench SUITE --out {out}' first")
    try:
        plan = json.loads(plan_f.read_text())
    except ValueError:
        raise UserError(f"{plan_f} is damaged; rerun 'mhpfl bench SUITE --out {out}' (finished runs are kept)") from None
    settings = {s["name"]: s for s in plan["settings"]}
    rows, curves, missing = [], {}, []
    for e in plan["entries"]:
        d = out / "runs" / f"{e['method']}-{e['key']}"
        if not (d / "summary.json").is_file():
            missing.append(e["run_id"])
            continue
        s = load_summary(d / "summary.json")
        if e["key"] not in curves:
            why = rounds_problem(d / ROUNDS)
            if why:
                raise UserError(f"{d / ROUNDS} is damaged ({why}); delete {d} and rerun "
                                f"'mhpfl bench SUITE --out {out}'") from None
            curves[e["key"]] = pd.read_csv(d / ROUNDS)
        c = curves[e["key"]]
        cfg = s["config"]
        m = max(1, round(cfg["frac"] * cfg["clients"]))
        setup = float(c.loc[c["round"] == 0, "train_flops"].sum())
        denom = s["rounds_run"] * m
        rows.append({**{k: e[k] for k in ("key", "group", "setting", "method", "seed", "run_id")},
                     "value": "" if e["value"] is None else str(e["value"]),
                     "label": settings[e["setting"]]["label"],
                     **{col: s[field] for col, (field, _) in ACC_VIEWS.items()},
                     "selected_round": s["selected_round"], "converged": bool(s["converged"]),
                     # no verdict: no validation data, or no evaluated round before or in the tail
                     "judged": "reason" not in (s.get("convergence") or {}),
                     "final_round": s.get("selection") == SELECTED_FINAL_ROUND,
                     "never_participated": s["never_participated"], "extra_data": s.get("extra_data"),
                     "public_size": s.get("public_size"),
                     "final_std_clients": s["final_std_acc"],
                     "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"], "train_flops": s["train_flops"],
                     "setup_flops": setup, "rounds": s["rounds_run"], "participants": m,
                     "flops_per_round": (s["train_flops"] - setup) / denom,
                     "up_per_round": s["bytes_up"] / denom, "down_per_round": s["bytes_down"] / denom,
                     "per_client_selected": s["per_client_selected_acc"], "wall_seconds": s["wall_seconds"],
                     "versions": cfg.get("versions", {})})
    if not rows:
        raise UserError(f"no finished runs in {out}; run 'mhpfl bench {plan.get('suite', 'SUITE')} --out {out}' first")
    return Results(out, plan, pd.DataFrame(rows), curves, missing)


# ---- aggregation --------------------------------------------------------------------------------
def main_runs(res: Results) -> pd.DataFrame:
    return res.runs[res.runs["group"] == "main"]


def settings_with_data(res: Results) -> list[dict]:
    present = set(main_runs(res)["setting"])
    return [s for s in res.plan["settings"] if s["name"] in present]


def methods_order(res: Results) -> list[str]:
    order = list(res.plan["methods"])
    for s in res.plan["settings"]:
        order += [m for m in s["methods"] if m not in order]
    planned = {e["method"] for e in res.plan["entries"] if e["group"] == "main"}
    return [m for m in order if m in planned]  # planned but unfinished ones show as "not run"


def accuracy_frame(res: Results) -> pd.DataFrame:
    """Per (setting, method): seeds, mean and sample std of every accuracy view, whether every
    seed converged (`verdict`: empty if a seed was not judged and none failed), and the extra
    data the method uses."""
    g = _flags(main_runs(res)).groupby(["setting", "method"], sort=False)
    aggs = {"n_seeds": ("seed", "nunique"),
            "unconverged": ("unconverged", "any"), "unjudged": ("unjudged", "any"),
            "final_round": ("final_round", "any"),
            "extra_data": ("extra_data", "first"), "public_size": ("public_size", "first")}
    for col in ACC_VIEWS:
        aggs[f"{col}_mean"], aggs[f"{col}_std"] = (col, "mean"), (col, "std")
    acc = g.agg(**aggs).reset_index()
    return acc.assign(converged=verdict(acc))


def _flags(runs: pd.DataFrame) -> pd.DataFrame:
    """runs with, per run, whether it did not converge by the verdict (`unconverged`), whether no
    verdict could be reached (`unjudged`), and whether it was reported at its final round for lack
    of validation data (`final_round`). Runs loaded without those fields count as judged."""
    judged = runs["judged"] if "judged" in runs else pd.Series(True, index=runs.index)
    final = runs["final_round"] if "final_round" in runs else pd.Series(False, index=runs.index)
    return runs.assign(unconverged=judged.astype(bool) & ~runs["converged"].astype(bool),
                       unjudged=~judged.astype(bool), final_round=final.astype(bool))


def verdict(flags: pd.DataFrame) -> pd.Series:
    """The CSVs' `converged` column from `_flags` (per run or per cell): True, False where a judged
    run did not converge, and empty (no verdict) where nothing judged failed but a run was not judged."""
    return (~flags["unconverged"]).astype("boolean").mask(flags["unjudged"] & ~flags["unconverged"])


def marks(unconverged: bool, unjudged: bool) -> str:
    """A cell's convergence marks: ‡ a seed did not converge, § a seed's convergence was not judged."""
    return (UNCONVERGED if unconverged else "") + (NOT_JUDGED if unjudged else "")


def verdict_notes(flags: pd.DataFrame, col: str = "acc") -> str:
    """The caption sentences for the marks and selections present in `flags` (rows with
    unjudged / final_round columns): empty when every run was judged and validation-selected."""
    text = ""
    if flags["unjudged"].any():
        text += (f" {NOT_JUDGED}: the convergence of at least one seed was not judged (no validation data, or no "
                 "evaluated round in its last 20% of rounds or before them).")
    if flags["final_round"].any() and col in SELECTED_VIEWS:
        text += (" A run without validation data (no client holds a validation split) is reported at its final "
                 "round instead.")
    return text


def paired_difference(res: Results, setting: str, ref: str, other: str, col: str = "acc") -> dict[str, Any]:
    """ref - other over the seeds both ran (paired by seed): mean and a 95% t-interval."""
    runs = main_runs(res)
    sub = runs[runs["setting"] == setting]
    a = sub[sub["method"] == ref].set_index("seed")[col]
    b = sub[sub["method"] == other].set_index("seed")[col]
    d = (a - b).dropna()
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan}
    if n >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
        out.update(lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def data_free(res: Results, methods: list[str]) -> list[str]:
    acc = accuracy_frame(res)
    extra = set(acc[acc["extra_data"].notna()]["method"])
    return [m for m in methods if m not in extra]


def mean_curve(res: Results, setting: str, method: str) -> pd.DataFrame:
    """Seed-averaged curve: round, mean_acc, cum_train_flops, cum_bytes (up + down)."""
    runs = main_runs(res)
    keys = runs[(runs["setting"] == setting) & (runs["method"] == method)]["key"].unique()
    frames = []
    for k in keys:
        c = res.curves[k]
        frames.append(pd.DataFrame({"round": c["round"], "mean_acc": c["mean_acc"],
                                    "cum_train_flops": c["cum_train_flops"].astype(float),
                                    "cum_bytes": (c["cum_bytes_up"] + c["cum_bytes_down"]).astype(float)}))
    return pd.concat(frames).groupby("round", sort=True).mean().reset_index()


def trained(curve: pd.DataFrame) -> pd.DataFrame:
    """The rounds >= 1 of a curve: round 0 is before any training and never counts."""
    return curve[curve["round"] >= 1]


def targets(res: Results, override: float | None = None) -> dict[str, float]:
    out = {}
    conf = res.plan["report"].get("target", "min-best")
    for s in settings_with_data(res):
        if override is not None:
            out[s["name"]] = float(override)
        elif s.get("target") is not None:
            out[s["name"]] = float(s["target"])
        elif conf != "min-best":
            out[s["name"]] = float(conf)
        else:
            ms = main_runs(res)[main_runs(res)["setting"] == s["name"]]["method"].unique()
            out[s["name"]] = min(float(trained(mean_curve(res, s["name"], m))["mean_acc"].max()) for m in ms)
    return out


def cost_frame(res: Results, target_override: float | None = None) -> pd.DataFrame:
    ref = res.plan["report"]["reference"]
    tg = targets(res, target_override)
    rows = []
    runs = main_runs(res)
    for s in settings_with_data(res):
        sub = runs[runs["setting"] == s["name"]]
        for m in methods_order(res):
            r = sub[sub["method"] == m]
            if r.empty:
                continue
            c = trained(mean_curve(res, s["name"], m))
            hit = c[c["mean_acc"] >= tg[s["name"]] - 1e-9]
            first = hit.iloc[0] if not hit.empty else None
            rows.append({"setting": s["name"], "label": s["label"], "method": m, "target_acc": tg[s["name"]],
                         "flops_per_round": r["flops_per_round"].mean(),
                         "bytes_up_per_round": r["up_per_round"].mean(),
                         "bytes_down_per_round": r["down_per_round"].mean(),
                         "bytes_per_round": (r["up_per_round"] + r["down_per_round"]).mean(),
                         "rounds_to_target": float(first["round"]) if first is not None else math.nan,
                         "flops_to_target": float(first["cum_train_flops"]) if first is not None else math.nan,
                         "bytes_to_target": float(first["cum_bytes"]) if first is not None else math.nan})
    df = pd.DataFrame(rows)
    for col in ("flops_per_round", "bytes_per_round", "rounds_to_target", "flops_to_target", "bytes_to_target"):
        refv = df[df["method"] == ref].set_index("setting")[col]
        df[f"{col}_x_{ref}"] = [_ratio(v, refv.get(s, math.nan)) for v, s in zip(df[col], df["setting"])]
    return df


def _ratio(a: float, b: float) -> float:
    if b is None or not np.isfinite(b) or not np.isfinite(a) or b == 0:
        return math.nan
    return float(a) / float(b)


# ---- formatting ---------------------------------------------------------------------------------
def si(x: float, unit: str = "") -> str:
    if x is None or not np.isfinite(x):
        return DASH
    if x == 0:
        return f"0 {unit}".strip()
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".strip()


def times(x: float) -> str:
    return DASH if x is None or not np.isfinite(x) else f"{x:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (pandas' to_markdown, via tabulate); cells are preformatted text."""
    return pd.DataFrame(rows, columns=header).to_markdown(
        index=False, disable_numparse=True, colalign=["left"] + ["right"] * (len(header) - 1)) + "\n"


def tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("—", "--"), ("−", "$-$"), ("×", r"$\times$"), ("†", r"$^\dagger$"),
                 ("‡", r"$^\ddagger$"), ("§", r"$^\S$")):
        s = s.replace(a, b)
    return s


def tex_table(header: list[str], rows: list[list[str]], bold: set[tuple[int, int]] = frozenset(),
              caption: str = "") -> str:
    """A booktabs tabular (pandas' Styler.to_latex); `bold` holds (row, column) cells to set in bold,
    `caption` goes in a comment line above it."""
    df = pd.DataFrame([[tex_escape(c) for c in r] for r in rows], columns=[tex_escape(h) for h in header])
    mask = pd.DataFrame([[(i, j) in bold for j in range(len(header))] for i in range(len(rows))],
                        columns=df.columns, dtype=bool)
    styler = df.style.hide(axis="index").apply(
        lambda _: np.where(mask, "textbf: --rwrap;", ""), axis=None)
    out = styler.to_latex(column_format="l" + "r" * (len(header) - 1), hrules=True)
    return (f"% {caption}\n" if caption else "") + out


# ---- tables -------------------------------------------------------------------------------------
def _disp_marked(m: str, extra: set[str]) -> str:
    return disp(m) + (DAGGER if m in extra else "")


def _view(res: Results, acc: pd.DataFrame, col: str) -> tuple[list[str], list[list[str]], set]:
    """One accuracy table: a row per method, a column per setting; bold = best of the column."""
    sets, methods = settings_with_data(res), methods_order(res)
    skipped = {s["name"]: set(s.get("skipped", [])) for s in res.plan["settings"]}
    extra = set(acc[acc["extra_data"].notna()]["method"])
    cell = {(r.setting, r.method): r for r in acc.itertuples()}
    best = {s["name"]: acc[acc["setting"] == s["name"]][f"{col}_mean"].max() for s in sets}
    rows, bold = [], set()
    for i, m in enumerate(methods):
        row = [_disp_marked(m, extra)]
        for j, s in enumerate(sets):
            r = cell.get((s["name"], m))
            if r is None:
                row.append(DASH if m in skipped[s["name"]] or m not in s["methods"] else "not run")
                continue
            mean, std = getattr(r, f"{col}_mean"), getattr(r, f"{col}_std")
            row.append(f"{mean:.2f}" + (f" ± {std:.2f}" if r.n_seeds > 1 else "") + marks(r.unconverged, r.unjudged))
            if math.isclose(mean, best[s["name"]], abs_tol=1e-9):
                bold.add((i, j + 1))
        rows.append(row)
    return ["Method"] + [s["label"] for s in sets], rows, bold


def _bold_md(rows: list[list[str]], bold: set) -> list[list[str]]:
    """Markdown cells with the bold ones wrapped (a trailing mark stays outside the bold)."""
    def b(c: str) -> str:
        core = c.rstrip(UNCONVERGED + NOT_JUDGED)
        return f"**{core}**{c[len(core):]}"
    return [[b(c) if (i, j) in bold else c for j, c in enumerate(r)] for i, r in enumerate(rows)]


def _caption(res: Results, acc: pd.DataFrame, col: str) -> str:
    seeds = "/".join(map(str, sorted(set(acc["n_seeds"]))))
    text = (f"{ACC_VIEWS[col][1][0].upper()}{ACC_VIEWS[col][1][1:]} (%); mean ± sample std over {seeds} seed(s) "
            f"(no ± with one seed). Best per column in bold. {UNCONVERGED}: at least one seed did not converge "
            "(the best mean validation accuracy of its last 20% of rounds beat the earlier best by 0.5 points or "
            f"more).{verdict_notes(acc, col)} {DASH}: the method cannot run in that setting (zoo) or is not in it.")
    ex = acc[acc["extra_data"].notna()]
    for m in dict.fromkeys(ex["method"]):
        sizes = ", ".join(f"{int(r.public_size)} samples in {_label(res, r.setting)}"
                          for r in ex[ex["method"] == m].itertuples()
                          if r.public_size is not None and np.isfinite(r.public_size))
        text += (f" {disp(m)}{DAGGER} uses {ex[ex['method'] == m]['extra_data'].iloc[0]}"
                 + (f" (public pool: {sizes})" if sizes else "") + ".")
    return text


def _label(res: Results, setting: str) -> str:
    return next(s["label"] for s in res.plan["settings"] if s["name"] == setting)


def accuracy_tables(res: Results) -> tuple[str, str, str]:
    acc = accuracy_frame(res)
    sets = settings_with_data(res)
    ref, baselines = res.plan["report"]["reference"], res.plan["report"]["baselines"]
    free = data_free(res, baselines)
    extra = [b for b in baselines if b not in free]
    header, rows, bold = _view(res, acc, "acc")
    cell = {(r.setting, r.method): r for r in acc.itertuples()}
    margin_rows = []
    for label, pool in ([(f"{disp(ref)} − best data-free baseline", free)]
                        + [(f"{disp(ref)} − {disp(b)}{DAGGER}", [b]) for b in extra]):
        line = [label]
        for s in sets:
            mine = cell.get((s["name"], ref))
            bl = [cell[(s["name"], b)] for b in pool if (s["name"], b) in cell]
            if mine is None or not bl:
                line.append(DASH)
                continue
            top = max(bl, key=lambda r: r.acc_mean)
            d = mine.acc_mean - top.acc_mean
            line.append(f"{d:+.2f} (vs {disp(top.method)})" if pool is free else f"{d:+.2f}")
            margin_rows.append({"setting": s["name"], "label": s["label"], "method": f"{ref}_margin",
                                "versus": top.method, "acc_mean": d})
        rows.append(line)
    md_rows = _bold_md(rows, bold)
    note = (_caption(res, acc, "acc") + f" Last rows: {disp(ref)} minus the most accurate of the data-free baselines "
            f"{', '.join(disp(b) for b in free)} that ran in the column" +
            (f", and minus each baseline that uses extra data ({', '.join(disp(b) for b in extra)})." if extra else "."))
    md = [f"# Accuracy: suite {res.plan['suite']}\n\n", md_table(header, md_rows), f"\n{note}\n"]
    for col in ACC_VIEWS:
        if col == "acc":
            continue
        h, r, b = _view(res, acc, col)
        md += [f"\n## {ACC_VIEWS[col][1][0].upper()}{ACC_VIEWS[col][1][1:]}\n\n", md_table(h, _bold_md(r, b)),
               f"\n{_caption(res, acc, col)}\n"]
    if res.missing:
        md.append(f"\nIncomplete: {len(res.missing)} planned run(s) have not finished (see README.md).\n")
    tex = tex_table(header, rows, bold, caption=note)
    labels = pd.DataFrame([{"setting": s["name"], "label": s["label"]} for s in sets])
    csv = pd.concat([acc.merge(labels, on="setting"), pd.DataFrame(margin_rows)], ignore_index=True)
    cols = ["setting", "label", "method", "versus", "n_seeds", "converged", "extra_data"] + \
        [f"{c}_{k}" for c in ACC_VIEWS for k in ("mean", "std")]
    for c in cols:
        if c not in csv:
            csv[c] = np.nan
    return "".join(md), tex, csv[cols].to_csv(index=False, float_format="%.6g")


def cost_tables(res: Results, target_override: float | None = None) -> tuple[str, str, str, pd.DataFrame]:
    df = cost_frame(res, target_override)
    ref = res.plan["report"]["reference"]
    R = disp(ref)
    header = ["Method", "FLOPs/round", "bytes up/round", "bytes down/round", "bytes/round",
              "rounds to target", "FLOPs to target", "bytes to target"]
    md = [f"# Cost: suite {res.plan['suite']}\n",
          f"Per round: per participating client (FLOPs of local training; bytes sent up and down). "
          f"To target: cumulative over all clients (setup included) until the seed-averaged mean accuracy "
          f"first reaches the setting's target. In parentheses: ratio to {R}'s value "
          f"(> 1: costs more than {R}). {DASH}: not reached or not defined.\n"]
    tex = []
    for s in settings_with_data(res):
        sub = df[df["setting"] == s["name"]]
        rows = []
        for r in sub.itertuples():
            def x(col):
                return times(getattr(r, f"{col}_x_{ref}"))
            rows.append([disp(r.method), f"{si(r.flops_per_round)} ({x('flops_per_round')})",
                         si(r.bytes_up_per_round, "B"), si(r.bytes_down_per_round, "B"),
                         f"{si(r.bytes_per_round, 'B')} ({x('bytes_per_round')})",
                         (f"{r.rounds_to_target:.0f} ({x('rounds_to_target')})" if np.isfinite(r.rounds_to_target) else DASH),
                         f"{si(r.flops_to_target)} ({x('flops_to_target')})" if np.isfinite(r.flops_to_target) else DASH,
                         f"{si(r.bytes_to_target, 'B')} ({x('bytes_to_target')})" if np.isfinite(r.bytes_to_target) else DASH])
        title = f"{s['label']}: target accuracy {sub['target_acc'].iloc[0]:.2f}%"
        md.append(f"## {title}\n\n" + md_table(header, rows))
        tex.append(tex_table(header, rows, caption=title))
    return "\n".join(md), "\n".join(tex), df.to_csv(index=False, float_format="%.6g"), df


def headline(res: Results, cost: pd.DataFrame) -> str:
    ref, baselines = res.plan["report"]["reference"], res.plan["report"]["baselines"]
    R = disp(ref)
    acc = accuracy_frame(res)
    free = data_free(res, baselines)
    extra = [b for b in baselines if b not in free]
    rows, deltas, comps, comms = [], [], [], []

    def claim(s: dict, pool: list[str], a: pd.DataFrame, c: pd.DataFrame) -> list[str] | None:
        bl = [b for b in pool if b in a.index]
        if ref not in a.index or not bl:
            return None
        top = max(bl, key=lambda b: a.loc[b, "acc_mean"])
        d = a.loc[ref, "acc_mean"] - a.loc[top, "acc_mean"]
        ratios = [_ratio(c.loc[top, k], c.loc[ref, k]) for k in
                  ("flops_per_round", "bytes_per_round", "flops_to_target", "bytes_to_target")]
        if pool is free:
            deltas.append(d), comps.append(ratios[0]), comms.append(ratios[1])
        mark = DAGGER if top in extra else ""
        return [s["label"], disp(top) + mark, f"{a.loc[ref, 'acc_mean']:.2f} vs {a.loc[top, 'acc_mean']:.2f}",
                f"{d:+.2f}", *map(times, ratios)]

    for s in settings_with_data(res):
        a = acc[acc["setting"] == s["name"]].set_index("method")
        c = cost[cost["setting"] == s["name"]].set_index("method")
        for pool in [free] + [[b] for b in extra]:
            row = claim(s, pool, a, c)
            rows.append(row if row is not None else [s["label"]] + [DASH] * 7)

    def gmean(v):
        v = [x for x in v if np.isfinite(x) and x > 0]
        return float(np.exp(np.mean(np.log(v)))) if v else math.nan

    header = ["Setting", "baseline", f"accuracy ({R} vs it)", "Δ accuracy (points)",
              "computation ratio / round", "communication ratio / round", "computation ratio to target",
              "communication ratio to target"]
    if deltas:
        rows.append(["**all settings** (data-free baselines: mean Δ, geometric-mean ratios)", "", "",
                     f"{np.mean(deltas):+.2f}", times(gmean(comps)), times(gmean(comms)), "", ""])
    rows.append(["**paper** (CIFAR-10/100, its figures)", "", "", f"+{PAPER['acc']:.2f}",
                 f"{PAPER['comp']:.2f}x", f"{PAPER['comm']:.2f}x", "", ""])

    prow = []
    for s in settings_with_data(res):
        for b in baselines:
            d = paired_difference(res, s["name"], ref, b)
            if d["n"] == 0:
                continue
            if d["n"] < 2:
                ci, zero = "n/a (1 seed)", "n/a"
            else:
                ci = f"[{d['lo']:+.2f}, {d['hi']:+.2f}]"
                zero = "yes: not significant" if d["lo"] <= 0 <= d["hi"] else "no"
            prow.append([s["label"], disp(b) + (DAGGER if b in extra else ""), str(d["n"]), f"{d['mean']:+.2f}", ci, zero])
    return (f"# Headline: suite {res.plan['suite']}\n\n"
            f"The paper's claim (\"no public data needed\"), recomputed on our runs: {R} against the most accurate "
            f"baseline that uses no extra data (among {', '.join(disp(b) for b in free)}) of each setting"
            + (f"; each baseline that uses extra data ({', '.join(disp(b) + DAGGER for b in extra)}) on a line of its own"
               if extra else "") + ".\n\n"
            + md_table(header, rows) +
            f"\n## {R} minus each baseline, paired over seeds\n\n"
            + md_table(["Setting", "baseline", "seeds", "mean Δ (points)", "95% interval", "interval contains 0"], prow)
            + f"\nHow each number is computed:\n"
            f"- accuracy: {ACC_VIEWS['acc'][1]}; mean over seeds.{verdict_notes(_flags(main_runs(res)))}\n"
            f"- Δ accuracy = {R}'s accuracy − the baseline's (points).\n"
            f"- paired interval: per seed, {R}'s accuracy minus the baseline's with the same seed (same partition "
            f"and participants); mean ± t(0.975, n−1) × sd / √n over the n seeds both ran.\n"
            f"- computation ratio / round = the baseline's client training FLOPs per participating client per "
            f"round ÷ {R}'s (x times less computation for {R} when > 1).\n"
            f"- communication ratio / round = the baseline's bytes (up + down) per participating client per "
            f"round ÷ {R}'s.\n"
            f"- ... to target: the same ratios for the cumulative FLOPs and bytes until the setting's target "
            f"accuracy is first reached after round 0 (see cost.md).\n"
            f"- all settings: mean of Δ, geometric mean of the per-round ratios, against the data-free baselines.\n"
            f"- {DAGGER}: the baseline uses data beyond the clients' own (labelled public data).\n"
            f"- paper: +{PAPER['acc']} points, {PAPER['comp']}x less computation and {PAPER['comm']}x less "
            f"communication than the most accurate baseline (arXiv 2310.13283, on CIFAR-10/100); "
            f"how the paper aggregates over settings is not known to us.\n")


def ablation_tables(res: Results) -> tuple[str, str]:
    abl = res.plan.get("ablations", [])
    shown = _flags(res.runs[res.runs["group"].str.startswith("ablation:")])
    rows_md, csv_rows = [], []
    for a in abl:
        sub = res.runs[res.runs["group"] == f"ablation:{a['name']}"]
        if sub.empty:
            continue
        label = next(s["label"] for s in res.plan["settings"] if s["name"] == a["setting"])
        rows = []
        for v in a["values"]:
            r = sub[sub["value"] == str(v)]
            if r.empty:
                rows.append([str(v), "not run", DASH, DASH])
                continue
            n, f = r["seed"].nunique(), _flags(r)
            acc = (f"{r['acc'].mean():.2f}" + (f" ± {r['acc'].std():.2f}" if n > 1 else "")
                   + marks(bool(f["unconverged"].any()), bool(f["unjudged"].any())))
            rows.append([str(v) + (" (default)" if str(v) == str(a["default"]) else ""), acc,
                         si(r["flops_per_round"].mean()), si((r["up_per_round"] + r["down_per_round"]).mean(), "B")])
            csv_rows.append({"ablation": a["name"], "method": a["method"], "setting": a["setting"],
                             "option": a["option"], "value": str(v), "n_seeds": n,
                             "acc_mean": r["acc"].mean(), "acc_std": r["acc"].std(),
                             "flops_per_round": r["flops_per_round"].mean(),
                             "bytes_per_round": (r["up_per_round"] + r["down_per_round"]).mean()})
        rows_md.append(f"## {disp(a['method'])}: {a['option']} ({label})\n\n"
                       + md_table([a["option"], "accuracy (%)", "FLOPs/round", "bytes/round"], rows))
    if not rows_md:
        return "", ""
    note = (f"Accuracy: {ACC_VIEWS['acc'][1]}; mean ± sample std over seeds. {UNCONVERGED}: a seed did not "
            f"converge.{verdict_notes(shown)}\n")
    return (f"# Ablation: suite {res.plan['suite']}\n\n" + "\n".join(rows_md) + "\n" + note,
            pd.DataFrame(csv_rows).to_csv(index=False, float_format="%.6g"))


# ---- plots --------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "mhpfl", "figure.dpi": 100, "font.size": 9})
    return plt


def _save(fig, out: Path, stem: str, written: list[str]) -> None:
    fig.savefig(out / f"{stem}.png", dpi=130, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None,
                                                                     "Producer": None, "Creator": None})
    written += [f"{stem}.png", f"{stem}.pdf"]


def _grid(plt, n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def line_looks(plt: Any, methods: list[str]) -> dict[str, tuple[Any, str]]:
    """Each method's (colour, line style) in the curve plots, distinct for up to 30 methods:
    tab10's ten colours, then again dashed, then dotted."""
    return {m: (plt.get_cmap("tab10")(i % 10), ("-", "--", ":")[i // 10 % 3]) for i, m in enumerate(methods)}


def plots(res: Results, out: Path) -> list[str]:
    plt = _plt()
    written: list[str] = []
    sets = settings_with_data(res)
    methods = methods_order(res)
    look = line_looks(plt, methods)
    colors = {m: c for m, (c, _) in look.items()}
    runs = main_runs(res)
    for stem, xcol, xlabel, logx in (("accuracy_vs_round", "round", "round", False),
                                     ("accuracy_vs_bytes", "cum_bytes", "cumulative bytes (up + down, all clients)", True),
                                     ("accuracy_vs_flops", "cum_train_flops", "cumulative client training FLOPs", True)):
        fig, axes = _grid(plt, len(sets))
        handles: dict[str, Any] = {}
        for ax, s in zip(axes, sets):
            silent = []
            for m in methods:
                if runs[(runs["setting"] == s["name"]) & (runs["method"] == m)].empty:
                    continue
                c = mean_curve(res, s["name"], m)
                if logx:
                    c = c[c[xcol] > 0]
                    if c.empty:  # nothing sent (Standalone) cannot sit on a log axis
                        silent.append(disp(m))
                        continue
                (line,) = ax.plot(c[xcol], c["mean_acc"], marker="." if len(c) < 30 else None,
                                  color=colors[m], linestyle=look[m][1], label=disp(m))
                handles.setdefault(disp(m), line)
            if logx:
                ax.set_xscale("log")
            if silent:
                ax.text(0.02, 0.02, f"not shown (x = 0): {', '.join(silent)}", transform=ax.transAxes, fontsize=7)
            ax.set_title(s["label"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean personalized accuracy (%)")
            ax.grid(alpha=0.3)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                       ncol=min(len(handles), 5), fontsize=8)
        _save(fig, out, stem, written)
        plt.close(fig)

    fig, axes = _grid(plt, len(sets))
    for ax, s in zip(axes, sets):
        data, labels = [], []
        for m in methods:
            r = runs[(runs["setting"] == s["name"]) & (runs["method"] == m)]
            if not r.empty:
                data.append(np.concatenate([np.asarray(v, float) for v in r["per_client_selected"]]))
                labels.append(disp(m))
        ax.boxplot(data, tick_labels=labels) if _mpl_ge("3.9") else ax.boxplot(data, labels=labels)
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_title(s["label"])
        ax.set_ylabel("per-client accuracy (%), selected round")
        ax.grid(alpha=0.3, axis="y")
    _save(fig, out, "client_accuracy", written)
    plt.close(fig)

    abl = [a for a in res.plan.get("ablations", []) if not res.runs[res.runs["group"] == f"ablation:{a['name']}"].empty]
    if abl:
        fig, axes = _grid(plt, len(abl))
        for ax, a in zip(axes, abl):
            sub = res.runs[res.runs["group"] == f"ablation:{a['name']}"]
            xs, ys, es = [], [], []
            for v in a["values"]:
                r = sub[sub["value"] == str(v)]
                if r.empty:
                    continue
                xs.append(str(v))
                ys.append(r["acc"].mean())
                es.append(r["acc"].std() if len(r) > 1 else 0.0)
            ax.errorbar(range(len(xs)), ys, yerr=es, marker="o", capsize=3, color=colors.get(a["method"], "C0"))
            ax.set_xticks(range(len(xs)), xs)
            label = next(s["label"] for s in res.plan["settings"] if s["name"] == a["setting"])
            ax.set_title(f"{disp(a['method'])}: {a['option']} ({label})")
            ax.set_xlabel(a["option"])
            ax.set_ylabel("accuracy (%), validation-selected round" if not _flags(sub)["final_round"].any()
                          else "accuracy (%), selected round (final without validation data)")
            ax.grid(alpha=0.3)
        _save(fig, out, "ablation", written)
        plt.close(fig)
    return written


def _mpl_ge(v: str) -> bool:
    import matplotlib

    return tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= tuple(int(x) for x in v.split("."))


# ---- README -------------------------------------------------------------------------------------
def _json_object(path: Path, fix: str) -> dict:
    """A JSON object file of the bench folder, or a one-line error saying how to `fix` it."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); {fix}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {fix}")
    return d


SESSION_KEYS = ("started", "wall_seconds", "runs_trained", "runs_cached", "jobs", "machine")
MACHINE_KEYS = ("cpu", "cores", "gpu", "device", "torch", "python", "platform")


def _session_ok(s: Any) -> bool:
    return (isinstance(s, dict) and all(k in s for k in SESSION_KEYS) and is_number(s["wall_seconds"])
            and isinstance(s["machine"], dict) and all(k in s["machine"] for k in MACHINE_KEYS))


def readme(res: Results, files: list[str]) -> str:
    bench_f = res.out / "bench.json"
    fix = "it only logs past bench sessions: delete it"
    log = _json_object(bench_f, fix) if bench_f.is_file() else {"sessions": []}
    if not (isinstance(log.get("sessions"), list) and all(_session_ok(s) for s in log["sessions"])):
        raise UserError(f"{bench_f} is damaged (a session lacks its time, runs or machine); {fix}")
    sessions = [s for s in log["sessions"] if s.get("suite") == res.plan["suite"]]
    uniq = res.runs.drop_duplicates("key")
    versions = sorted({json.dumps(v, sort_keys=True) for v in uniq["versions"]})
    run_files = [res.out / "runs" / f"{m}-{k}" / "run.json" for m, k in zip(uniq["method"], uniq["key"])]
    codes = sorted({str(_json_object(f, f"delete {f.parent} and rerun 'mhpfl bench'").get("code", "?"))
                    for f in run_files if f.is_file()})
    lines = [f"# Results of suite `{res.plan['suite']}`", "",
             res.plan.get("description", ""), "",
             f"Suite file: `{res.plan['source']}` (copy: `suite.toml`). Regenerate with "
             f"`mhpfl bench {res.plan['suite']} --out {res.out}` (cached runs are reused; `--force` reruns) "
             f"or only the tables and plots with `mhpfl report {res.out}`.", "",
             f"Runs: {len(uniq)} finished of {len({e['key'] for e in res.plan['entries']})} planned."]
    if res.missing:
        lines.append(f"Not finished ({len(res.missing)}): " + ", ".join(f"`{m}`" for m in res.missing[:20])
                     + (" ..." if len(res.missing) > 20 else ""))
    lines += ["", "## Environment", ""]
    machines = sorted({json.dumps(s["machine"], sort_keys=True) for s in sessions})
    for mj in machines:
        m = json.loads(mj)
        lines.append(f"- machine: {m['cpu']}, {m['cores']} cores; GPU: {m['gpu'] or 'none used'}; "
                     f"device {m['device']}; torch {m['torch']}; Python {m['python']}; {m['platform']}")
    for vj in versions:
        v = json.loads(vj)
        lines.append("- libraries of the runs: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    lines.append(f"- code fingerprint(s) of the runs: {', '.join(codes) or 'unknown'}"
                 + (" (runs from different code: rerun with --force for one version)" if len(codes) > 1 else ""))
    lines += ["", "## Time", ""]
    total = float(uniq["wall_seconds"].sum())
    for s in sessions:
        lines.append(f"- bench session started {s['started']}: {s['wall_seconds'] / 60:.1f} min wall time, "
                     f"{s['runs_trained']} run(s) trained, {s['runs_cached']} cached, --jobs {s['jobs']}"
                     + (f", stopped by {s['interrupted']}" if s.get("interrupted") else ""))
    lines.append(f"- sum of the runs' own wall times: {total / 60:.1f} min")
    lines += ["", "## Files", ""]
    desc = {"accuracy": "main table: validation-selected mean personalized test accuracy per method and setting, "
                        "then the other views (weighted, participated clients, best on test, final)",
            "cost": "FLOPs and bytes per round, rounds/FLOPs/bytes to the target accuracy, ratios",
            "headline": "the paper's claim recomputed", "ablation": "pFedLoRA ablation",
            "runs.csv": "one row per run: every number the tables use",
            "accuracy_vs_round": "accuracy vs round per setting",
            "accuracy_vs_bytes": "accuracy vs cumulative bytes (log x)",
            "accuracy_vs_flops": "accuracy vs cumulative FLOPs (log x)",
            "client_accuracy": "per-client accuracy distribution per method at the validation-selected round",
            "runs/": "every run: summary.json, rounds.csv (per evaluated round), run.json (config, key)"}
    stems = dict.fromkeys(f.rsplit(".", 1)[0] for f in files if f != "README.md")
    for stem in stems:
        exts = sorted(f.rsplit(".", 1)[1] for f in files if f.rsplit(".", 1)[0] == stem)
        lines.append(f"- `{stem}.{{{','.join(exts)}}}`: {desc.get(stem, desc.get(stem + '.csv', ''))}")
    lines.append(f"- `runs/`: {desc['runs/']}")
    return "\n".join(lines) + "\n"


def check_target(target: float | None, flag: str = "--target") -> None:
    """An accuracy target is a percentage in (0, 100]."""
    if target is not None and not (0 < target <= 100):
        raise UserError(f"{flag} must be an accuracy in percent, in (0, 100] (got {target:g})")


def runs_csv(res: Results) -> str:
    """runs.csv: one row per run; `converged` is empty for a run whose convergence was not judged."""
    cols = ["run_id", "group", "setting", "method", "seed", "value", "key", *ACC_VIEWS, "selected_round",
            "converged", "never_participated", "extra_data", "public_size",
            "bytes_up", "bytes_down", "train_flops", "setup_flops", "rounds", "participants",
            "flops_per_round", "up_per_round", "down_per_round", "wall_seconds"]
    return res.runs.assign(converged=verdict(_flags(res.runs)))[cols].to_csv(index=False, float_format="%.6g")


# ---- entry point --------------------------------------------------------------------------------
def write_report(out: str | Path, target: float | None = None, do_plots: bool = True) -> list[str]:
    """Write every table, plot and the README into `out`; return the file names written."""
    check_target(target)
    res = load(out)
    out = res.out
    files: list[str] = []

    def put(name: str, text: str) -> None:
        if text:
            atomic_write_text(out / name, text)
            files.append(name)

    md, tex, csv = accuracy_tables(res)
    put("accuracy.md", md), put("accuracy.tex", tex), put("accuracy.csv", csv)
    cmd, ctex, ccsv, cost = cost_tables(res, target)
    put("cost.md", cmd), put("cost.tex", ctex), put("cost.csv", ccsv)
    put("headline.md", headline(res, cost))
    amd, acsv = ablation_tables(res)
    put("ablation.md", amd), put("ablation.csv", acsv)
    put("runs.csv", runs_csv(res))
    if do_plots:
        files += plots(res, out)
    put("README.md", readme(res, files))
    return files
