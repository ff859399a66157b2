"""Static checks run with the tests: ``mypy --strict`` on the package and ruff's lint rules
(pyproject.toml) on everything. They catch what no CPU test reaches, such as a name made local
by an import further down a function that only a CUDA path reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_mypy_strict_finds_nothing() -> None:
    pytest.importorskip("mypy")
    proc = _run("mypy", "--strict", "distrib")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_finds_nothing() -> None:
    pytest.importorskip("ruff")
    proc = _run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
