"""First use: the install (no deprecation warnings from our pyproject, a CPU-only torch on
request), `make bench-smoke` shows progress, a fork gets the same CI as `.ci/run`."""
from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_pyproject_license_is_an_spdx_string():
    """setuptools >= 77 deprecates `license = { text = ... }` (a warning on every install)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    assert "hypothesis" in " ".join(meta["project"]["optional-dependencies"]["dev"])
    assert "catalog.json" in meta["tool"]["setuptools"]["package-data"]["mhpfl"]


@needs_make
def test_make_install_can_take_cpu_torch():
    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu} torch torchvision" in make_n("install", f"TORCH_INDEX={cpu}")
    assert "--index-url" not in make_n("install")
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()


@needs_make
def test_bench_smoke_shows_progress():
    runs = [ln for ln in make_n("bench-smoke").splitlines() if " run " in ln]
    assert len(runs) == 2 and not any("--quiet" in ln for ln in runs)


def test_github_workflow_runs_the_ci_entry_point():
    wf = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "run: .ci/run" in wf and "actions/checkout" in wf and "python-version" in wf
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make check" in ci
