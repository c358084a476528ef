"""The MNIST paired notebooks under nbval, owner and scientist side by side (short run).

Each notebook runs in its own `pytest --nbval` process (its own kernel); they
meet over real WebRTC on 127.0.0.1. The owner notebook writes its join code to
$DUET_HANDOFF_DIR/mnist.code, the scientist notebook waits for it there;
DUET_NOTEBOOK_SHORT=1 trains on 512 images for one epoch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "mnist"

pytest.importorskip("nbval")


def test_mnist_notebooks_side_by_side(tmp_path):
    env = {
        **os.environ,
        "DUET_NOTEBOOK_SHORT": "1",
        "DUET_HANDOFF_DIR": str(tmp_path),
        "DUET_LOCAL_ONLY": "1",
        "DUET_CONFIG_DIR": str(tmp_path / "config"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", str(NB / f"{name}.ipynb")],
            cwd=str(NB), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("owner", "scientist")
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name], _ = proc.communicate(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} notebook failed under nbval:\n{outputs[name][-4000:]}"
