"""Commands that only parse arguments or list things answer without importing torch, peft or
fvcore (seconds of start-up); the start-up catalog they read is current."""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "peft", "fvcore", "torchvision", "pandas")

PROBE = """
import sys
from mhpfl.cli import main
try:
    code = main({argv!r})
except SystemExit as e:  # argparse: --help exits 0, an argument error 2
    code = e.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("RESULT", code, ",".join(heavy))
"""


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0),
    (["list"], 0),
    (["run", "pfedlora", "--help"], 0),
    (["run", "fedkd", "--help"], 0),
    (["run", "standalone", "--rounds", "x"], 2),  # argparse error
    (["run", "pfedlora", "--no-such-flag"], 2),
    (["run", "nosuch"], 2),  # unknown method
    (["bench", "--help"], 0),
    (["report", "--help"], 0),
    (["check", "--help"], 0),
    (["compare", "--help"], 0),
])
def test_metadata_commands_do_not_import_torch(argv, code):
    p = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                       text=True, timeout=120)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT"))
    _, got, heavy = (line.split(" ") + [""])[:3]
    assert int(got) == code, p.stdout + p.stderr
    assert heavy == "", (f"'mhpfl {' '.join(argv)}' imported {heavy}; if a method's options changed, "
                         "regenerate the catalog: python -m mhpfl.catalog")


def test_catalog_is_current():
    """catalog.json equals what the live classes say (regenerate: python -m mhpfl.catalog)."""
    from mhpfl import catalog

    assert json.loads(catalog.CATALOG.read_text()) == json.loads(catalog.render(catalog.build())), (
        "mhpfl/catalog.json is stale: run python -m mhpfl.catalog")


def test_stale_catalog_entry_falls_back_to_the_class(monkeypatch, tmp_path):
    """An entry whose source changed is never used: the command line imports the class."""
    from mhpfl import catalog
    from mhpfl.cli import _method_meta
    from mhpfl.methods.pfedlora import PFedLoRA

    data = json.loads(catalog.CATALOG.read_text())
    data["methods"]["pfedlora"]["sha256"] = "0" * 64
    data["methods"]["pfedlora"]["options"]["rank"]["default"] = 99
    f = tmp_path / "catalog.json"
    f.write_text(json.dumps(data))
    monkeypatch.setattr(catalog, "CATALOG", f)
    assert catalog.method_info("pfedlora") is None
    assert _method_meta("pfedlora") is PFedLoRA
    assert catalog.method_info("fedkd").options["mentee"].default == "cnn5"  # others still fresh


def test_run_help_prints_each_default_once_and_explains_clients(capsys):
    from mhpfl.cli import main

    with pytest.raises(SystemExit):
        main(["run", "standalone", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for flag in ("--partition", "--data-root", "--lr", "--clients"):
        help_ = flat.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert help_.count("default") <= 1, help_
    assert "N*K must be divisible by the number of classes" in flat


def test_compare_shows_a_missing_best_on_test_as_not_available(tmp_path, capsys):
    """A run with --test-eval improved has no best-on-test accuracy: compare says n/a."""
    from mhpfl.cli import main
    from mhpfl.results import REQUIRED_FIELDS

    for name, best in (("every", 91.5), ("improved", None)):
        s = {f: 0 for f in REQUIRED_FIELDS}
        s.update(method="standalone", config={"seed": 0, "test_eval": name}, best_mean_acc=best,
                 selected_mean_acc=90.0, final_mean_acc=89.0, rounds_run=5, converged=None,
                 per_client_selected_acc=[90.0])
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert main(["compare", str(tmp_path / "every"), str(tmp_path / "improved")]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if "standalone" in r]
    assert "91.5" in rows[0] and "n/a" in rows[1] and "nan" not in rows[1]


def test_the_result_line_says_how_the_round_was_chosen_and_whether_convergence_was_judged():
    from mhpfl.cli import _result_line

    base = {"method": "standalone", "selected_mean_acc": 90.0, "selected_round": 7, "best_mean_acc": 91.0,
            "final_mean_acc": 89.0, "bytes_up": 0, "bytes_down": 0, "train_flops": 1.0}
    judged = {**base, "selection": "best mean validation accuracy", "converged": False,
              "convergence": {"converged": False, "gain": 0.9}}
    assert "(round 7, best on validation; not converged)" in _result_line(judged, "out")
    assert "(round 7, best on validation)" in _result_line({**judged, "converged": True}, "out")
    blind = {**base, "selection": "final round (no validation data)", "converged": False,
             "convergence": {"converged": False, "gain": None, "reason": "too few evaluated rounds or no validation data"}}
    line = _result_line(blind, "out")
    assert "(round 7, final round (no validation data); convergence not judged)" in line
    assert "best on validation" not in line


def test_compare_says_how_each_round_was_chosen_and_which_verdicts_were_reached(tmp_path, capsys):
    from mhpfl.cli import main
    from mhpfl.results import REQUIRED_FIELDS

    for name, sel, conv in (("val", "best mean validation accuracy", {"converged": True, "gain": 0.1}),
                            ("noval", "final round (no validation data)",
                             {"converged": False, "gain": None, "reason": "no validation data"})):
        s = {f: 0 for f in REQUIRED_FIELDS}
        s.update(method="standalone", config={"seed": 0, "val_size": 0 if name == "noval" else 100}, rounds_run=5,
                 selected_round=5 if name == "noval" else 3, selection=sel, converged=conv["converged"],
                 convergence=conv, per_client_selected_acc=[0.0])
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert main(["compare", str(tmp_path / "val"), str(tmp_path / "noval")]) == 0
    out = capsys.readouterr().out
    assert "val-selected" not in out
    val, noval = (r for r in out.splitlines() if "standalone" in r)
    assert "round 3, best on validation" in val and "| converged" in val
    assert "round 5, final round (no validation data)" in noval and "not judged" in noval


@pytest.mark.parametrize("argv,says", [
    # the option ../shared/paper-notes.md names is --adapter here: the error points to it
    (["run", "pfedlora", "--adapter-targets", "fc3"],
     "mhpfl run: error: unrecognized arguments: --adapter-targets fc3 (did you mean --adapter-epochs or "
     "--adapter?); see 'mhpfl run pfedlora --help'"),
    (["run", "pfedlora", "--rank", "x"],  # a method option: named once, said like argparse's own types
     "mhpfl run: error: argument --rank: invalid int value: 'x'; see 'mhpfl run pfedlora --help'"),
    (["run", "standalone", "--rounds", "x"],
     "mhpfl run: error: argument --rounds: invalid int value: 'x'; see 'mhpfl run standalone --help'"),
    (["bench", "quick", "--jbos", "2"],
     "mhpfl bench: error: unrecognized arguments: --jbos 2 (did you mean --jobs?); see 'mhpfl bench --help'"),
    (["run"], "mhpfl run: error: the following arguments are required: method; see 'mhpfl run METHOD --help'"),
])
def test_a_usage_error_is_one_line_that_says_what_to_do(argv, says, capsys):
    """argparse prints its whole usage block before the error; ours print one line: the error, the
    nearest options to a misspelt one, and the command that lists them."""
    from mhpfl.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == says + "\n"


def test_an_unknown_command_names_the_nearest(capsys):
    from mhpfl.cli import main

    assert main(["rnu"]) == 2
    assert capsys.readouterr().err == "error: unknown command 'rnu' (did you mean run?)\n"
