"""Method registry: built-in methods and third-party plugins.

A plugin is an installed package that declares an entry point in the group `mhpfl.methods`
whose value is a `Method` subclass (see docs/methods.md). Built-ins are imported lazily.

`register(cls)` adds a method to this process only (tests, notebooks, scripts that define a
method inline). Such a method is visible to runs in the same process (`mhpfl bench --jobs 1`,
`mhpfl.engine.run`), not to worker processes: use an entry point for those.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from mhpfl.errors import UserError
from mhpfl.methods.base import Message, Method, Option

__all__ = ["Method", "Message", "Option", "BUILTIN", "get_method", "available_methods", "register",
           "unregister"]

BUILTIN: dict[str, str] = {
    "standalone": "mhpfl.methods.standalone:Standalone",
    "fedavg": "mhpfl.methods.fedavg:FedAvg",
    "pfedlora": "mhpfl.methods.pfedlora:PFedLoRA",
    "fedmd": "mhpfl.methods.fedmd:FedMD",
    "fedkd": "mhpfl.methods.fedkd:FedKD",
    "fml": "mhpfl.methods.fml:FML",
    "lgfedavg": "mhpfl.methods.lgfedavg:LGFedAvg",
    "fd": "mhpfl.methods.fd:FD",
    "fedproto": "mhpfl.methods.fedproto:FedProto",
    "fedgh": "mhpfl.methods.fedgh:FedGH",
    "fedtgp": "mhpfl.methods.fedtgp:FedTGP",
}
ENTRY_POINT_GROUP = "mhpfl.methods"
_REGISTERED: dict[str, type[Method]] = {}  # in-process registrations (see `register`)


def register(cls: type[Method], name: str | None = None) -> type[Method]:
    """Make `cls` available as method `name` (default `cls.name`) in this process; replaces an
    earlier in-process registration of the same name. Sets `cls.name = name` (summaries record
    it), so register a subclass to reuse one class under several names. Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register() needs a Method subclass, got {cls!r}")
    name = name or cls.name
    if name in BUILTIN:
        raise ValueError(f"'{name}' is a built-in method; register under another name")
    cls.name = name
    _REGISTERED[name] = cls
    return cls


def unregister(name: str) -> None:
    """Undo `register(…, name)` (no-op if absent)."""
    _REGISTERED.pop(name, None)


def _load(target: str) -> type[Method]:
    mod, _, attr = target.partition(":")
    return getattr(import_module(mod), attr)


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in BUILTIN and ep.name not in _REGISTERED}


def _load_plugin(name: str, ep) -> type[Method]:
    dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
    try:
        cls = ep.load()
    except Exception as e:  # a broken plugin must not take the suite down
        raise UserError(f"method '{name}' comes from plugin {dist}, which failed to load "
                        f"({type(e).__name__}: {e}); fix, reinstall or uninstall that package") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"plugin {dist} registers '{name}' as {ep.value}, which is not a "
                        "mhpfl.methods.Method subclass; fix or uninstall that package")
    why = plugin_class_problem(cls)
    if why:
        raise UserError(f"plugin {dist}'s method '{name}' ({ep.value}) {why}; fix or uninstall that package")
    if getattr(cls, "name", None) != name:
        cls.name = name
    return cls


def plugin_class_problem(cls: type[Method]) -> str | None:
    """What keeps a plugin's Method subclass from being listed and run, or None: a hook it must
    define, its one-line description, a malformed option."""
    from mhpfl.methods.base import in_interval

    if getattr(cls, "__abstractmethods__", None):
        return f"does not define {', '.join(sorted(cls.__abstractmethods__))}"
    if not isinstance(getattr(cls, "description", None), str):
        return "has no one-line `description` (a str class attribute)"
    if not isinstance(cls.options, dict) or not all(isinstance(o, Option) for o in cls.options.values()):
        return "has `options` that are not a dict of mhpfl.methods.Option"
    for k, o in cls.options.items():
        try:
            o.interval and in_interval(0, o.interval)
        except (ValueError, IndexError):
            return f"gives option {k} the interval {o.interval!r}, not one like '[0, inf)'"
    return None


def get_method(name: str) -> type[Method]:
    if name in BUILTIN:
        return _load(BUILTIN[name])
    if name in _REGISTERED:
        return _REGISTERED[name]
    plugins = _plugins()
    if name in plugins:
        return _load_plugin(name, plugins[name])
    known = ", ".join(sorted({*BUILTIN, *_REGISTERED, *plugins}))
    raise UserError(f"unknown method '{name}'; choose one of {known} (see 'mhpfl list')")


def available_methods(builtin: dict | None = None) -> dict[str, type[Method] | UserError]:
    """Every method name -> its class, or the error that loading its plugin raised. `builtin`:
    what to list for the built-ins instead of importing them (e.g. their catalog entries)."""
    out: dict = dict(builtin) if builtin is not None else {n: _load(t) for n, t in BUILTIN.items()}
    out.update(_REGISTERED)
    for name, ep in sorted(_plugins().items()):
        try:
            out[name] = _load_plugin(name, ep)
        except UserError as e:
            out[name] = e
    return out
