"""The built distribution is publishable and usable: scripts/check_package.sh builds the sdist and the
wheel, runs ``twine check --strict``, installs the wheel into a fresh venv without downloads and
imports it from there (not from this source tree), checking the version and ``py.typed``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_built_wheel_passes_twine_and_imports_from_a_fresh_venv():
    pytest.importorskip("build", reason="`build` is in the test extra")
    pytest.importorskip("twine", reason="`twine` is in the test extra")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_package.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "twine check" in result.stdout and result.stdout.count("PASSED") == 2
    assert "py.typed included" in result.stdout and "imported from" in result.stdout
    assert result.stdout.rstrip().endswith("== package OK")
