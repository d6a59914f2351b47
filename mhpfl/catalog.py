"""Start-up catalog: what `mhpfl list`, `mhpfl run METHOD --help` and argument checking need,
answered without importing torch (which takes seconds).

`catalog.json` (next to this file) is generated from the live objects, never written by hand:
the built-in methods' description, model zoos and options; the datasets; the model zoos. Each
entry records the SHA-256 of the source file it was generated from; an entry whose source has
changed since is ignored (the caller imports the real thing instead), so the catalog can make
a command slower when stale, never wrong. Regenerate after changing a method's options,
description or zoos, a dataset or a zoo:

    python -m mhpfl.catalog

(tests/test_cli_fast.py fails while it is stale).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhpfl.methods.base import Option

PACKAGE = Path(__file__).resolve().parent
CATALOG = PACKAGE / "catalog.json"
DATASETS_SOURCE = "datasets/loaders.py"
ZOOS_SOURCE = "models/__init__.py"


@dataclass(frozen=True)
class MethodInfo:
    """A method's metadata, as far as the command line needs it (duck-types the class)."""

    name: str
    description: str
    zoos: tuple[str, ...]
    options: dict[str, Option]


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    num_classes: int
    in_shape: tuple[int, ...]


def _sha(rel: str) -> str:
    try:
        return hashlib.sha256((PACKAGE / rel).read_bytes()).hexdigest()
    except OSError:
        return ""


def _method_source(target: str) -> str:
    return target.partition(":")[0].removeprefix("mhpfl.").replace(".", "/") + ".py"


def _load() -> dict[str, Any]:
    try:
        return json.loads(CATALOG.read_text())
    except (OSError, ValueError):
        return {}


def _fresh(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(entry, dict) or entry.get("sha256") != _sha(entry.get("source", "")):
        return None
    return entry


def method_info(name: str) -> MethodInfo | None:
    """A built-in method's metadata from the catalog, or None (not built in, or stale)."""
    from mhpfl.methods import BUILTIN

    if name not in BUILTIN:
        return None
    e = _fresh(_load().get("methods", {}).get(name))
    if e is None or e["source"] != _method_source(BUILTIN[name]):
        return None
    opts = {k: Option(o["default"], o["help"], tuple(o["choices"]) if o["choices"] is not None else None,
                      interval=o.get("interval"))
            for k, o in e["options"].items()}
    return MethodInfo(name, e["description"], tuple(e["zoos"]), opts)


def datasets() -> list[DatasetSummary] | None:
    e = _fresh(_load().get("datasets"))
    return None if e is None else [DatasetSummary(d["name"], d["num_classes"], tuple(d["in_shape"]))
                                   for d in e["items"]]


def zoos() -> dict[str, str] | None:
    e = _fresh(_load().get("zoos"))
    return None if e is None else dict(e["items"])


# ---- generation (imports everything) ------------------------------------------------------------
def build() -> dict[str, Any]:
    """The catalog of the current sources (imports torch and every built-in method)."""
    from mhpfl.datasets import DATASETS
    from mhpfl.methods import BUILTIN, get_method
    from mhpfl.models import ZOOS

    methods = {}
    for name, target in BUILTIN.items():
        cls = get_method(name)
        if any(o.type is not None for o in cls.options.values()):
            continue  # a custom option parser cannot be stored: this method always loads its class
        src = _method_source(target)
        methods[name] = {
            "source": src, "sha256": _sha(src), "description": cls.description, "zoos": list(cls.zoos),
            "options": {k: {"default": o.default, "help": o.help,
                            "choices": list(o.choices) if o.choices is not None else None,
                            "interval": o.interval}
                        for k, o in cls.options.items()}}
    return {
        "methods": methods,
        "datasets": {"source": DATASETS_SOURCE, "sha256": _sha(DATASETS_SOURCE),
                     "items": [{"name": d.name, "num_classes": d.num_classes, "in_shape": list(d.in_shape)}
                               for d in DATASETS.values()]},
        "zoos": {"source": ZOOS_SOURCE, "sha256": _sha(ZOOS_SOURCE), "items": dict(ZOOS)},
    }


def render(catalog: dict[str, Any]) -> str:
    return json.dumps(catalog, indent=1) + "\n"  # insertion order: the classes' option order


def main() -> None:
    from mhpfl.io import atomic_write_text

    atomic_write_text(CATALOG, render(build()))
    print(f"wrote {CATALOG}")


if __name__ == "__main__":
    main()
