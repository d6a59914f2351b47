"""The report's definitions on hand-made runs: which accuracy a table shows, the extra-data mark,
the data-free headline, the paired interval over seeds, the convergence mark."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from tests._bench_util import squash
from mhpfl.benchmark.report import ACC_VIEWS, Results, accuracy_tables, paired_difference

METHODS = ["fedmd", "fd", "pfedlora"]
ACCS = {"pfedlora": [80.0, 82.0, 84.0], "fd": [79.0, 80.0, 84.0], "fedmd": [90.0, 91.0, 92.0]}


def results(converged: bool = True, unjudged: tuple[str, int] | None = None) -> Results:
    """Three methods x three seeds in one setting; `unjudged` = (method, seed) of a run without
    validation data (reported at its final round, no convergence verdict)."""
    rows = []
    for m in METHODS:
        for seed, a in enumerate(ACCS[m]):
            blind = (m, seed) == unjudged
            row = {"setting": "S", "method": m, "seed": seed, "group": "main", "key": f"{m}{seed}",
                   "converged": (converged or m != "fd") and not blind, "judged": not blind, "final_round": blind,
                   "extra_data": "labelled public data" if m == "fedmd" else None,
                   "public_size": 120 if m == "fedmd" else None}
            row.update({col: a + i for i, col in enumerate(ACC_VIEWS)})  # each view a distinct number
            rows.append(row)
    plan = {"suite": "t", "methods": METHODS,
            "settings": [{"name": "S", "label": "FMNIST (10, 100%)", "methods": METHODS, "skipped": []}],
            "report": {"reference": "pfedlora", "baselines": ["fedmd", "fd"]},
            "entries": [{"group": "main", "method": m} for m in METHODS]}
    return Results(None, plan, pd.DataFrame(rows), {}, [])


def test_paired_difference_is_a_t_interval_over_seeds():
    d = paired_difference(results(), "S", "pfedlora", "fd")
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # differences 1, 2, 0: mean 1, sd 1
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.0)
    assert (d["lo"], d["hi"]) == pytest.approx((1 - half, 1 + half))


def test_main_table_shows_the_validation_selected_accuracy_and_marks_extra_data():
    md, tex, csv = accuracy_tables(results())
    main = squash(md.split("\n## ")[0])
    assert "| FedMD† | **91.00 ± 1.00** |" in main  # selected accuracy ("acc"), the mean over 3 seeds
    assert "at the round with the best mean validation accuracy" in main
    assert "FedMD† uses labelled public data (public pool: 120 samples in FMNIST (10, 100%))" in main
    # the headline margin is against the best data-free baseline (FD), FedMD on its own line
    assert "| pFedLoRA − best data-free baseline | +1.00 (vs FD) |" in main
    assert "| pFedLoRA − FedMD† | -9.00 |" in main
    # the other views follow, each with its own caption
    for col, (_, text) in ACC_VIEWS.items():
        if col != "acc":
            assert text[1:] in md
    assert r"FedMD$^\dagger$ & \textbf{91.00 $\pm$ 1.00} \\" in tex  # booktabs tabular, best in bold
    assert tex.startswith("% ") and r"\toprule" in tex and r"\bottomrule" in tex
    assert "acc_participated_mean" in csv.splitlines()[0]


def test_unconverged_cells_are_marked():
    md, _, _ = accuracy_tables(results(converged=False))
    assert "| FD | 81.00 ± 2.65‡ |" in squash(md.split("\n## ")[0])
    assert "‡: at least one seed did not converge" in md


def test_every_method_in_the_curve_plots_has_its_own_line_look():
    """tab10 has ten colours; the quick suite has eleven methods (FedAvg shared Standalone's blue)."""
    from mhpfl.benchmark.report import _plt, line_looks

    methods = [f"m{i}" for i in range(25)]
    looks = [(tuple(c), style) for c, style in line_looks(_plt(), methods).values()]
    assert len(set(looks)) == len(methods)


def test_a_run_without_a_convergence_verdict_is_marked_apart_from_one_that_did_not_converge():
    """A run without validation data has no verdict (its summary says converged: false, with a
    reason) and is reported at its final round: the table marks it § and says so, and calls no
    cell unconverged that was not judged; tables of judged, validation-selected runs say neither."""
    md, tex, _ = accuracy_tables(results(unjudged=("pfedlora", 1)))
    main = squash(md.split("\n## ")[0])
    assert "| pFedLoRA | 82.00 ± 2.00§ |" in main and "‡" not in main.split("\n\n")[1]
    assert "§: the convergence of at least one seed was not judged (no validation data" in main
    assert "reported at its final round instead" in main
    final_view = md.split("\n## ")[-1]  # the last round's view: not a selection, so no final-round note
    assert final_view.startswith(ACC_VIEWS["final_acc"][1][0].upper()) and "final round instead" not in final_view
    assert "§: the convergence" in final_view
    assert r"82.00 $\pm$ 2.00$^\S$" in tex
    # both marks at once: FD unconverged by its verdict, and one seed unjudged
    md, _, _ = accuracy_tables(results(converged=False, unjudged=("fd", 0)))
    assert "| FD | 81.00 ± 2.65‡§ |" in squash(md.split("\n## ")[0])
    plain, _, _ = accuracy_tables(results(converged=False))
    assert "§" not in plain and "final round instead" not in plain


def test_the_verdict_flags_of_runs():
    """Unconverged = judged and not converged; a run without the judged / final_round fields
    (loaded by hand, as in these tests) counts as judged and validation-selected."""
    from mhpfl.benchmark.report import _flags

    runs = pd.DataFrame({"converged": [True, False, False, False],
                         "judged": [True, True, False, True], "final_round": [False, False, True, False]})
    f = _flags(runs)
    assert f["unconverged"].tolist() == [False, True, False, True]
    assert f["unjudged"].tolist() == [False, False, True, False]
    bare = _flags(runs.drop(columns=["judged", "final_round"]))
    assert bare["unjudged"].tolist() == [False] * 4 and bare["unconverged"].tolist() == [False, True, True, True]


def test_the_csvs_leave_converged_empty_where_no_verdict_was_reached():
    """runs.csv and accuracy.csv: True / False by the verdict, empty for a run (or a cell of seeds)
    not judged, so an unjudged run never reads as one that failed to converge."""
    from io import StringIO

    from mhpfl.benchmark.report import runs_csv

    res = results(converged=False, unjudged=("pfedlora", 1))
    extra = {"run_id": "r", "value": "", "selected_round": 1, "never_participated": 0, "bytes_up": 1,
             "bytes_down": 1, "train_flops": 1, "setup_flops": 0, "rounds": 1, "participants": 1,
             "flops_per_round": 1, "up_per_round": 1, "down_per_round": 1, "wall_seconds": 1}
    res.runs = res.runs.assign(**extra)
    runs = pd.read_csv(StringIO(runs_csv(res)))
    got = {(r.method, r.seed): r.converged for r in runs.itertuples()}
    assert got[("pfedlora", 0)] is True and got[("fedmd", 2)] is True
    assert got[("fd", 1)] is False and pd.isna(got[("pfedlora", 1)])
    _, _, csv = accuracy_tables(res)
    cells = pd.read_csv(StringIO(csv)).set_index("method")["converged"]
    assert cells["fedmd"] is True and cells["fd"] is False and pd.isna(cells["pfedlora"])
    # a cell with a failed seed is False even if another seed was not judged
    _, _, csv = accuracy_tables(results(converged=False, unjudged=("fd", 0)))
    assert pd.read_csv(StringIO(csv)).set_index("method")["converged"]["fd"] is False
