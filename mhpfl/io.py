"""Atomic file writes: a reader never sees a half-written result."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mhpfl.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename: the previous file stays intact
    until the new one is complete. A failed write (full disk, no permission) raises a one-line
    UserError naming the file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = " (the previous version is unchanged)" if path.exists() else ""
            raise UserError(f"cannot write {path}: {e.strerror or e}{kept}; free space or choose a "
                            "writable folder, then rerun") from None
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
