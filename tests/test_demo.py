"""`make demo` runs the main job end to end; this runs the same module."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end():
    result = subprocess.run([sys.executable, "-m", "duet.demo"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "released after the owner's rule approved it: tensor(79.5000)" in result.stdout
    assert "demo succeeded" in result.stdout
    assert "audit: release" in result.stderr
