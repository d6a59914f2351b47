"""Suite files: validation with one-line errors, expansion, run keys, the shipped suites."""
from __future__ import annotations

import pytest

from tests._bench_util import Probe, write_suite
from mhpfl.benchmark.suite import load_suite, run_key, shipped_suites
from mhpfl.cli import main
from mhpfl.config import RunConfig
from mhpfl.errors import UserError
from mhpfl.methods import register, unregister

EVERY_METHOD = {"standalone", "fedavg", "fedmd", "fedkd", "fml", "lgfedavg", "fd", "fedproto", "fedgh", "fedtgp", "pfedlora"}


def _err(tmp_path, data_root, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_suite(str(write_suite(tmp_path, data_root, **kw)))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_suites_give_one_line_errors(tmp_path, data_root):
    assert "unknown key(s) colour" in _err(tmp_path, data_root, extra="colour = 1")
    assert "unknown method 'nosuch'" in _err(tmp_path, data_root, methods=("standalone", "nosuch"))
    assert "unknown dataset 'mnist2'" in _err(tmp_path, data_root, extra='dataset = "mnist2"')
    assert "has no option bogus" in _err(tmp_path, data_root, methods=("pfedlora",),
                                         extra="[settings.method_options.pfedlora]\nbogus = 1")
    assert "expected an integer" in _err(tmp_path, data_root, extra='clients = "ten"')
    assert "public_size" in _err(tmp_path, data_root, extra='public_size = "abc"')  # None by default
    assert "--rank must be a whole number (got 1.5)" in _err(tmp_path, data_root, methods=("pfedlora",),
                                                              extra="[settings.method_options.pfedlora]\nrank = 1.5")
    assert "[report]: unknown method 'nosuch2'" in _err(tmp_path, data_root, extra='[report]\nreference = "nosuch2"')
    assert "tolerance_per_method must be a table" in _err(tmp_path, data_root,
                                                          extra="[check]\ntolerance_per_method = 5")
    assert "fedavg supports only the homo zoo" in _err(tmp_path, data_root, extra='methods = ["fedavg"]')
    assert "no runs (fedavg supports only the homo zoo and no setting uses it; set zoo" in _err(
        tmp_path, data_root, methods=("fedavg",))  # the suite's list: skipped where it cannot run
    assert "is for single runs (mhpfl run)" in _err(tmp_path, data_root, extra='test_eval = "improved"')
    bad = write_suite(tmp_path, data_root, extra="[[ablations]]\nname='r'\nsetting='A'\noption='nope'\nvalues=[1]")
    with pytest.raises(UserError, match="pfedlora has no option 'nope'"):
        load_suite(str(bad))
    (tmp_path / "latin1.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_suite(str(tmp_path / "latin1.toml"))
    (tmp_path / "broken.toml").write_text("methods = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_suite(str(tmp_path / "broken.toml"))
    with pytest.raises(UserError, match="unknown suite 'nosuchsuite'"):
        load_suite("nosuchsuite")


def test_a_folder_named_like_a_suite_does_not_hide_it(tmp_path, monkeypatch):
    """`mhpfl bench quick --out quick` a second time, or `mhpfl check` inside results/ (which
    holds smoke/): the name is the shipped suite, not the folder in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "mine").mkdir()
    assert load_suite("smoke").name == "smoke"
    with pytest.raises(UserError, match="'mine' is a folder, not a suite file"):
        load_suite("mine")


def test_cli_bad_suite_is_one_line(tmp_path, data_root, capsys):
    p = write_suite(tmp_path, data_root, extra="colour = 1")
    assert main(["bench", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "colour" in err and "\n" not in err


def test_expansion_skips_methods_of_other_zoos_and_dedupes_ablation(tmp_path, data_root):
    p = write_suite(tmp_path, data_root, methods=("standalone", "fedavg", "pfedlora"), extra="""
[[settings]]
name = "H"
zoo = "homo"
[[ablations]]
name = "rank"
setting = "A"
option = "rank"
values = [1, 8]
""")
    s = load_suite(str(p))
    a, h = s.settings
    assert a.methods == ["standalone", "pfedlora"] and a.skipped == ["fedavg"]
    assert h.methods == ["standalone", "fedavg", "pfedlora"] and not h.skipped
    # rank 8 is pFedLoRA's default: the ablation's rank-8 run is the main run (one key)
    assert len(s.entries) == 7 and len(s.runs()) == 6
    main_lora = next(e for e in s.entries if e.group == "main" and e.setting == "A" and e.method == "pfedlora")
    abl8 = next(e for e in s.entries if e.group == "ablation:rank" and e.value == 8)
    assert main_lora.key == abl8.key


def test_run_key_covers_what_changes_results_only():
    base = RunConfig(method="pfedlora", clients=5, frac=1.0)
    k = run_key(base)
    assert run_key(RunConfig(method="pfedlora", clients=5, frac=1.0, method_options={"rank": 8})) == k
    assert run_key(RunConfig(method="pfedlora", clients=5, frac=1.0, data_root="/x", download=False)) == k
    assert run_key(RunConfig(method="pfedlora", clients=5, frac=1.0, method_options={"rank": 4})) != k
    assert run_key(RunConfig(method="pfedlora", clients=5, frac=1.0, seed=1)) != k
    assert run_key(RunConfig(method="pfedlora", clients=5, frac=0.4)) != k

    class V1(Probe):
        version = "1"

    class V2(Probe):
        version = "2"

    try:
        register(V1, "keyprobe")
        k1 = run_key(RunConfig(method="keyprobe"))
        register(V2, "keyprobe")
        assert run_key(RunConfig(method="keyprobe")) != k1  # bumping a method's version reruns it
    finally:
        unregister("keyprobe")


def test_int_and_float_spellings_give_one_key(tmp_path, data_root):
    k1 = load_suite(str(write_suite(tmp_path, data_root, name="a", extra="frac = 1"))).entries[0].key
    k2 = load_suite(str(write_suite(tmp_path, data_root, name="b", extra="frac = 1.0"))).entries[0].key
    assert k1 == k2


@pytest.mark.parametrize("name", ["smoke", "quick", "full", "paper"])
def test_shipped_suites(name):
    assert name in shipped_suites()
    s = load_suite(name, only_available=True)  # methods not installed yet are dropped here only
    import tomllib
    from importlib import resources

    raw = tomllib.loads(resources.files("mhpfl.benchmark").joinpath("suites", f"{name}.toml").read_text())
    listed = set(raw["methods"]) | {m for st in raw["settings"] for m in st.get("methods", [])}
    assert listed == EVERY_METHOD  # every method of the benchmark
    for st in s.settings:
        assert "fedavg" not in st.methods or st.cfg.zoo == "homo"
    for a in s.ablations:  # 0 adapter epochs means --local-epochs: that value again repeats the main run
        if a["option"] == "adapter_epochs":
            local = next(st.cfg.local_epochs for st in s.settings if st.name == a["setting"])
            assert local not in a["values"], (a, local)
    if name == "quick":
        # the 45-minute suite: full's N10 setting alone, the very same runs (keys), 3 seeds
        full = load_suite("full", only_available=True)
        assert [(st.name, st.cfg.clients, st.cfg.frac) for st in s.settings] == [("N10-C100", 10, 1.0)]
        assert s.settings[0].seeds == [0, 1, 2] and not s.ablations
        n10 = {e.key for e in full.entries if e.group == "main" and e.setting == "N10-C100"}
        assert {e.key for e in s.entries} == n10 and len(n10) == 30
    if name == "full":
        # the lineage's settings, with ~20 participations per client and 3 seeds
        assert {(st.cfg.clients, st.cfg.frac) for st in s.settings} >= {(10, 1.0), (50, 0.2), (100, 0.1)}
        assert all(st.cfg.rounds * st.cfg.frac >= 20 for st in s.settings)
        assert all(st.seeds == [0, 1, 2] for st in s.settings)
        assert any(st.cfg.zoo == "homo" for st in s.settings)
        assert {a["option"] for a in s.ablations} >= {"rank", "adapter", "adapter_epochs"}
        assert next(a for a in s.ablations if a["option"] == "rank")["values"] == [1, 4, 8, 10]
        assert next(a for a in s.ablations if a["option"] == "adapter")["values"] == ["fc3", "auto", "model"]
        pf = [e for e in s.entries if e.group.startswith("ablation:")]
        assert pf and {e.seed for e in pf} == {0, 1, 2}
    if name == "paper":
        assert {st.cfg.dataset for st in s.settings} == {"cifar10", "cifar100"}
        assert all(st.cfg.rounds == 500 for st in s.settings)
        assert {(st.cfg.clients, st.cfg.frac) for st in s.settings} == {(10, 1.0), (50, 0.2), (100, 0.1)}
        assert {st.cfg.partition for st in s.settings} == {"pathological:2", "pathological:10"}


def test_a_dry_run_refuses_what_the_real_run_refuses(tmp_path, data_root, capsys):
    suite = write_suite(tmp_path, data_root)
    for flag in ("--jobs", "--threads"):
        assert main(["bench", str(suite), "--dry-run", flag, "0"]) == 2
        assert f"{flag} must be >= 1 (got 0)" in capsys.readouterr().err
