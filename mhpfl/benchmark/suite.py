"""Benchmark suites: declarative TOML files expanded into run configurations.

A suite file (see the shipped `suites/smoke.toml`, `quick.toml`, `full.toml`, `paper.toml`; copy and edit):

    name = "quick"                      # optional; default: the file's stem
    description = "..."
    methods = ["standalone", "pfedlora", ...]   # every setting runs these ...
    seeds = [0, 1, 2]                   # ... with each of these seeds (default [0])

    [defaults]                          # any `mhpfl run` setting (RunConfig field)
    dataset = "fmnist"
    rounds = 30

    [method_options.fedmd]              # method options for every setting
    public_subset = 500

    [[settings]]                        # one column of the tables; overrides [defaults]
    name = "N10-C1"                     # optional; default built from dataset, zoo, N, C
    clients = 10
    frac = 1.0
    # methods = [...]                   # optional: replaces the suite's list here
    # seeds = [...]                     # optional
    # target = 80.0                     # optional: accuracy target of the cost table
    # [settings.method_options.fedmd]   # optional: merged over the suite's method options

    [[ablations]]                       # one panel of the ablation plot
    name = "rank"
    method = "pfedlora"                 # default pfedlora
    setting = "N10-C1"                  # the base setting (by name)
    option = "rank"
    values = [1, 4, 8, 16]

    [report]
    reference = "pfedlora"              # the method margins and ratios are measured against
    baselines = ["fedmd", "fedkd", "fml", "lgfedavg", "fd", "fedproto", "fedgh", "fedtgp"]
    target = "min-best"                 # or a number (percent): the cost table's target

    [check]
    tolerance = 2.0                     # accuracy, absolute points
    tolerance_per_method = { fedkd = 3.0 }
    bytes_rel_tolerance = {}            # per method; default 0: bytes must match exactly

A method listed at suite level that does not support a setting's zoo (FedAvg on the
heterogeneous zoo) is skipped in that setting; listing it in the setting's own `methods` is an
error.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from mhpfl.config import RunConfig
from mhpfl.errors import UserError

SIX_BASELINES = ("fedmd", "fedkd", "fml", "lgfedavg", "fd", "fedproto", "fedgh", "fedtgp")
TOP_KEYS = {"name", "description", "methods", "seeds", "defaults", "method_options", "settings",
            "ablations", "report", "check"}
SETTING_KEYS = {"name", "methods", "seeds", "target", "method_options"}
ABLATION_KEYS = {"name", "method", "setting", "option", "values", "seeds"}
REPORT_KEYS = {"reference", "baselines", "target"}
CHECK_KEYS = {"tolerance", "tolerance_per_method", "bytes_rel_tolerance"}
# RunConfig fields a suite may set (method and method_options are set by the suite's structure)
# (seed too: seeds are listed with `seeds = [...]`)
RUN_FIELDS = {f.name: f for f in fields(RunConfig) if f.name not in ("method", "method_options", "seed")}


@dataclass
class Setting:
    name: str
    label: str  # column header: dataset [zoo] (N, C), and [name] where two settings share that
    overrides: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    target: float | None
    method_options: dict[str, dict[str, Any]]
    cfg: RunConfig  # the setting's run settings (method "-")
    skipped: list[str] = field(default_factory=list)  # methods that cannot run on this zoo


@dataclass
class Entry:
    """One cell contribution: (group, setting, method, seed) -> a run (by key)."""

    key: str
    group: str  # "main" or "ablation:<name>"
    setting: str
    method: str
    seed: int
    value: Any = None  # ablation value
    cfg: RunConfig | None = None

    @property
    def run_id(self) -> str:
        """Stable human-readable id (used by the regression reference)."""
        tail = "" if self.group == "main" else f"|{self.group}={self.value}"
        return f"{self.setting}|{self.method}|seed{self.seed}{tail}"


@dataclass
class Suite:
    name: str
    description: str
    source: str
    text: str
    settings: list[Setting]
    ablations: list[dict[str, Any]]
    methods: list[str]
    report: dict[str, Any]
    check: dict[str, Any]
    entries: list[Entry]

    def runs(self) -> dict[str, Entry]:
        """Unique runs, in suite order: key -> first entry naming it."""
        out: dict[str, Entry] = {}
        for e in self.entries:
            out.setdefault(e.key, e)
        return out

    def plan(self) -> dict[str, Any]:
        """What `report` needs, as JSON (written to OUT/suite.json)."""
        return {
            "suite": self.name, "description": self.description, "source": self.source,
            "methods": self.methods,
            "settings": [{"name": s.name, "label": s.label, "target": s.target, "skipped": s.skipped,
                          "methods": s.methods, "dataset": s.cfg.dataset, "clients": s.cfg.clients,
                          "frac": s.cfg.frac, "zoo": s.cfg.zoo, "rounds": s.cfg.rounds,
                          "eval_every": s.cfg.eval_every}
                         for s in self.settings],
            "ablations": self.ablations, "report": self.report, "check": self.check,
            "entries": [{"key": e.key, "group": e.group, "setting": e.setting, "method": e.method,
                         "seed": e.seed, "value": e.value, "run_id": e.run_id} for e in self.entries],
        }


# ---- locating and reading ---------------------------------------------------------------------
def shipped_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mhpfl.benchmark").joinpath("suites").iterdir()
                  if p.name.endswith(".toml"))


def suite_path(name_or_path: str) -> tuple[str, str]:
    """(source description, TOML text) of a shipped suite name or a file path. A folder is never
    a suite: `mhpfl bench quick --out quick`, or `mhpfl check` run inside results/ (which holds
    smoke/), means the shipped suite, not the folder of that name."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise UserError(f"suite file {p} not found; pass a shipped suite "
                            f"({', '.join(shipped_suites())}) or a path to a .toml file")
        try:
            return str(p), p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"suite file {p} is not UTF-8 text (TOML is); save it as UTF-8") from None
    res = resources.files("mhpfl.benchmark").joinpath("suites", f"{name_or_path}.toml")
    if not res.is_file():
        what = f"'{name_or_path}' is a folder, not a suite file" if p.exists() else f"unknown suite '{name_or_path}'"
        raise UserError(f"{what}; choose one of {', '.join(shipped_suites())} or pass a path to a .toml file")
    return f"mhpfl/benchmark/suites/{name_or_path}.toml", res.read_text()


def load_suite(name_or_path: str, *, overrides: dict[str, Any] | None = None,
               only_available: bool = False) -> Suite:
    """Read, validate and expand a suite. `overrides` (e.g. device, data_root) apply to every run.
    `only_available`: drop methods that are not installed instead of failing (used by tests of
    the shipped suites)."""
    source, text = suite_path(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"suite {source} is not valid TOML ({e}); fix the file") from None
    stem = Path(source).stem
    return build_suite(raw, source=source, text=text, default_name=stem, overrides=overrides or {},
                       only_available=only_available)


# ---- validation helpers -----------------------------------------------------------------------
def _unknown(where: str, got: dict, known: set[str], extra: str = "") -> None:
    bad = sorted(set(got) - known)
    if bad:
        raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}{extra}")


def _expect(where: str, value: Any, typ, what: str):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {what}, got {value!r}")
    return value


def _run_fields(where: str, d: dict[str, Any]) -> dict[str, Any]:
    """Check types of RunConfig fields; coerce ints to floats where a float is expected (so
    `frac = 1` and `frac = 1.0` give the same run key)."""
    out = {}
    for k, v in d.items():
        default = RunConfig(method="-").__getattribute__(k)
        if k == "augment":
            if v is not None:
                _expect(f"{where}.{k}", v, bool, "true or false")
        elif k == "data_root":
            _expect(f"{where}.{k}", v, str, "a path string")
        elif k == "public_size":  # None by default: a client's mean private set
            _expect(f"{where}.{k}", v, int, "an integer")
        elif isinstance(default, bool):
            _expect(f"{where}.{k}", v, bool, "true or false")
        elif isinstance(default, float):
            v = _expect(f"{where}.{k}", v, float, "a number")
        elif isinstance(default, int):
            _expect(f"{where}.{k}", v, int, "an integer")
        elif isinstance(default, str):
            _expect(f"{where}.{k}", v, str, "a string")
        out[k] = v
    return out


def _percent(where: str, v: float) -> float:
    if not 0 < v <= 100:
        raise UserError(f"{where} must be an accuracy in percent, in (0, 100] (got {v:g})")
    return v


def _str_list(where: str, v: Any) -> list[str]:
    if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
        raise UserError(f"{where}: expected a non-empty list of names, got {v!r}")
    if len(set(v)) != len(v):
        raise UserError(f"{where}: lists a name twice ({v!r})")
    return list(v)


def _seed_list(where: str, v: Any) -> list[int]:
    if not (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise UserError(f"{where}: expected a non-empty list of integer seeds, got {v!r}")
    return list(dict.fromkeys(v))


def _method_cls(where: str, name: str, only_available: bool):
    from mhpfl.methods import get_method

    try:
        return get_method(name)
    except UserError as e:
        if only_available:
            return None
        raise UserError(f"{where}: {e}") from None


def _options(where: str, v: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
        raise UserError(f"{where}: expected tables [method_options.METHOD] of option = value")
    return {m: dict(o) for m, o in v.items()}


def setting_label(cfg: RunConfig) -> str:
    names = {"fmnist": "FMNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    zoo = "" if cfg.zoo == "hetero" else f" {cfg.zoo}"
    return f"{names.get(cfg.dataset, cfg.dataset)}{zoo} ({cfg.clients}, {cfg.frac:.0%})"


# ---- run keys ---------------------------------------------------------------------------------
# Fields that cannot change a run's results: where the data lives, whether it may be downloaded,
# the device and whether clients train batched (CPU and GPU runs, batched or not, of one
# configuration are the same experiment; they differ only by floating-point rounding — use
# another --out to keep both).
KEY_EXCLUDED = ("data_root", "download", "device", "batch_clients")


def run_key(cfg: RunConfig) -> str:
    """Cache key of a run: hash of its full configuration with method options resolved to their
    values (so an option left at its default and the same value written out are one run), the
    method's `version` and the package version (engine changes that move every method's numbers
    come with a package version bump; within a version use --force)."""
    import mhpfl
    from mhpfl.datasets import dataset_info
    from mhpfl.methods import get_method

    cls = get_method(cfg.method)
    d = cfg.to_dict()
    for k in KEY_EXCLUDED:
        d.pop(k, None)
    if d.get("precision") == "fp32":  # the default: keys of runs cached before --precision existed hold
        d.pop("precision")
    if d.get("test_eval") == "every":  # likewise before --test-eval
        d.pop("test_eval")
    d["method_options"] = dict(sorted(cls(**cfg.method_options).hp.items()))
    if d["augment"] is None:
        d["augment"] = dataset_info(cfg.dataset).augment
    material = {"config": d, "method_version": str(cls.version), "mhpfl": mhpfl.__version__}
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- building -----------------------------------------------------------------------------------
def build_suite(raw: dict[str, Any], *, source: str, text: str, default_name: str,
                overrides: dict[str, Any], only_available: bool = False) -> Suite:
    where = f"suite {source}"
    _unknown(where, raw, TOP_KEYS)
    name = _expect(f"{where}: name", raw.get("name", default_name), str, "a string")
    description = _expect(f"{where}: description", raw.get("description", ""), str, "a string")
    if "methods" not in raw:
        raise UserError(f"{where}: missing 'methods = [...]' (the methods every setting runs)")
    methods = _str_list(f"{where}: methods", raw["methods"])
    seeds = _seed_list(f"{where}: seeds", raw.get("seeds", [0]))
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{where}: [defaults] must be a table of run settings")
    _unknown(f"{where} [defaults]", defaults, set(RUN_FIELDS))
    defaults = _run_fields(f"{where} [defaults]", defaults)
    suite_opts = _options(f"{where} [method_options]", raw.get("method_options", {}))
    classes = {}
    for m in [*methods, *suite_opts]:
        cls = _method_cls(f"{where}: methods", m, only_available)
        if cls is not None:
            classes[m] = cls
    methods = [m for m in methods if m in classes]

    raw_settings = raw.get("settings")
    if not isinstance(raw_settings, list) or not raw_settings:
        raise UserError(f"{where}: needs at least one [[settings]] table")
    settings: list[Setting] = []
    entries: list[Entry] = []
    for i, s in enumerate(raw_settings):
        sw = f"{where} [[settings]] #{i + 1}"
        if not isinstance(s, dict):
            raise UserError(f"{sw}: must be a table")
        _unknown(sw, s, SETTING_KEYS | set(RUN_FIELDS))
        run_over = _run_fields(sw, {k: v for k, v in s.items() if k in RUN_FIELDS})
        merged = {**defaults, **run_over, **overrides}
        if merged.get("test_eval", "every") != "every":
            raise UserError(f"{sw}: test_eval = {merged['test_eval']!r} is for single runs (mhpfl run): a suite's "
                            "report needs the test split at every evaluated round (best-on-test column, curves, "
                            "rounds to target); remove it")
        probe = RunConfig(method="-", **merged)
        sname = _expect(f"{sw}: name", s.get("name", _auto_name(probe)), str, "a string")
        sw = f"{where} setting '{sname}'"
        if any(x.name == sname for x in settings):
            raise UserError(f"{sw}: two settings share this name; give each a unique name")
        explicit = "methods" in s
        s_methods = _str_list(f"{sw}: methods", s["methods"]) if explicit else methods
        s_seeds = _seed_list(f"{sw}: seeds", s["seeds"]) if "seeds" in s else seeds
        target = s.get("target")
        if target is not None:
            target = _percent(f"{sw}: target", _expect(f"{sw}: target", target, float, "a number (percent)"))
        s_opts = _options(f"{sw}: method_options", s.get("method_options", {}))
        setting = Setting(sname, setting_label(probe), merged, [], s_seeds, target, {}, probe)
        for m in s_methods:
            cls = classes.get(m) or _method_cls(f"{sw}: methods", m, only_available)
            if cls is None:
                continue
            classes[m] = cls
            if probe.zoo not in cls.zoos:
                if explicit:
                    raise UserError(f"{sw}: {m} supports only the {' or '.join(cls.zoos)} zoo, not "
                                    f"'{probe.zoo}'; remove it from this setting's methods")
                setting.skipped.append(m)
                continue
            setting.methods.append(m)
            setting.method_options[m] = {**suite_opts.get(m, {}), **s_opts.get(m, {})}
            for seed in s_seeds:
                cfg = _make_cfg(sw, m, merged, setting.method_options[m], seed)
                entries.append(Entry(run_key(cfg), "main", sname, m, seed, None, cfg))
        for m in s_opts:  # an unknown method named in the setting's options is an error
            _method_cls(f"{sw}: method_options", m, only_available)
        settings.append(setting)
    shared = [x.label for x in settings]
    for x in settings:  # settings that differ only where the label does not look (rounds, data share)
        if shared.count(x.label) > 1:
            x.label = f"{x.label} [{x.name}]"

    ablations = []
    for i, a in enumerate(raw.get("ablations", [])):
        aw = f"{where} [[ablations]] #{i + 1}"
        if not isinstance(a, dict):
            raise UserError(f"{aw}: must be a table")
        _unknown(aw, a, ABLATION_KEYS)
        for k in ("name", "setting", "option", "values"):
            if k not in a:
                raise UserError(f"{aw}: missing '{k}'")
        aname = _expect(f"{aw}: name", a["name"], str, "a string")
        aw = f"{where} ablation '{aname}'"
        if any(x["name"] == aname for x in ablations):
            raise UserError(f"{aw}: two ablations share this name")
        m = _expect(f"{aw}: method", a.get("method", "pfedlora"), str, "a method name")
        cls = _method_cls(f"{aw}: method", m, only_available)
        base = next((x for x in settings if x.name == a["setting"]), None)
        if base is None:
            raise UserError(f"{aw}: setting '{a['setting']}' is not one of "
                            f"{', '.join(x.name for x in settings)}")
        option = _expect(f"{aw}: option", a["option"], str, "an option name")
        values = a["values"]
        if not isinstance(values, list) or not values:
            raise UserError(f"{aw}: values must be a non-empty list")
        a_seeds = _seed_list(f"{aw}: seeds", a["seeds"]) if "seeds" in a else base.seeds
        if cls is None:
            continue
        if option not in cls.options:
            raise UserError(f"{aw}: {m} has no option '{option}'; options: {', '.join(cls.options)}")
        if base.overrides.get("zoo", "hetero") not in cls.zoos:
            raise UserError(f"{aw}: {m} cannot run on setting '{base.name}' (zoo)")
        classes[m] = cls
        ablations.append({"name": aname, "method": m, "setting": base.name, "option": option,
                          "values": values, "default": cls.options[option].default})
        base_opts = {**suite_opts.get(m, {}), **base.method_options.get(m, {})}
        for v in values:
            for seed in a_seeds:
                cfg = _make_cfg(aw, m, base.overrides, {**base_opts, option: v}, seed)
                entries.append(Entry(run_key(cfg), f"ablation:{aname}", base.name, m, seed, v, cfg))

    report = raw.get("report", {})
    if not isinstance(report, dict):
        raise UserError(f"{where}: [report] must be a table")
    _unknown(f"{where} [report]", report, REPORT_KEYS)
    rep = {"reference": _expect(f"{where} [report] reference", report.get("reference", "pfedlora"), str, "a method"),
           "baselines": _str_list(f"{where} [report] baselines", report.get("baselines", list(SIX_BASELINES))),
           "target": report.get("target", "min-best")}
    for m in [rep["reference"]] * ("reference" in report) + rep["baselines"] * ("baselines" in report):
        _method_cls(f"{where} [report]", m, only_available=False)  # a name given must be a method
    if rep["target"] != "min-best":
        rep["target"] = _percent(f"{where} [report] target",
                                 _expect(f"{where} [report] target", rep["target"], float, '"min-best" or a number'))

    check = raw.get("check", {})
    if not isinstance(check, dict):
        raise UserError(f"{where}: [check] must be a table")
    _unknown(f"{where} [check]", check, CHECK_KEYS)
    per_method = {}
    for key in ("tolerance_per_method", "bytes_rel_tolerance"):
        t = check.get(key, {})
        if not isinstance(t, dict):
            raise UserError(f"{where} [check] {key} must be a table of method = number (e.g. {{ fedkd = 3.0 }})")
        per_method[key] = {k: _expect(f"{where} [check] {key}.{k}", v, float, "a number") for k, v in t.items()}
    chk = {"tolerance": _expect(f"{where} [check] tolerance", check.get("tolerance", 2.0), float, "a number"),
           **per_method}
    if not entries:
        skipped = sorted({m for st in settings for m in st.skipped})
        why = ", ".join(f"{m} supports only the {' or '.join(classes[m].zoos)} zoo" for m in skipped)
        raise UserError(f"{where}: expands to no runs ("
                        + (f"{why} and no setting uses it; set zoo in a setting" if skipped
                           else "no installed method can run any setting") + ")")
    return Suite(name, description, source, text, settings, ablations, methods, rep, chk, entries)


def _auto_name(cfg: RunConfig) -> str:
    zoo = "" if cfg.zoo == "hetero" else f"-{cfg.zoo}"
    return f"{cfg.dataset}{zoo}-N{cfg.clients}-C{cfg.frac:g}"


def _make_cfg(where: str, method: str, run_fields: dict[str, Any], opts: dict[str, Any], seed: int) -> RunConfig:
    cfg = RunConfig(method=method, method_options=dict(opts), **{**run_fields, "seed": seed})
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{where}, {method}: {e}") from None
    return cfg
