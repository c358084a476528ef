"""Packaging: two distributions whose folders are their import names, one version source,
py.typed everywhere, and the Jupyter extension enabled in the development environment.

The slow tests build from a copy of the sources, so they check that each distribution's
folder holds all it needs, and they leave no build output in the checkout.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

import duet
import duet_jupyter
import duet_signaling

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"duet": duet, "duet_signaling": duet_signaling, "duet_jupyter": duet_jupyter}
SERVER_CONFIG = "etc/jupyter/jupyter_server_config.d/duet_jupyter.json"

pytestmark = pytest.mark.timeout(180)


def _clean_env() -> Dict[str, str]:
    """The environment for a child in another venv: nothing pointing back into this one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(args: List[str], timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_clean_env(), **kwargs)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _copy(names: List[str], dest: Path) -> Path:
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    dest.mkdir(parents=True)
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


# ------------------------------------------------------------------ one version source
def test_the_version_has_one_source() -> None:
    assert importlib.metadata.version("duet-p2p") == duet.__version__
    assert importlib.metadata.version("duet-signaling") == duet_signaling.__version__
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    for path, attr in [("pyproject.toml", "duet.__version__"),
                       ("signaling/pyproject.toml", "duet_signaling.__version__")]:
        with open(ROOT / path, "rb") as f:
            config = tomllib.load(f)
        assert "version" not in config["project"] and "version" in config["project"]["dynamic"], path
        assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": attr}, path
    assert not (ROOT / "setup.cfg").exists()


def test_duet_p2p_depends_on_duet_signaling_and_the_relay_on_tornado_only() -> None:
    requirements = importlib.metadata.requires("duet-p2p") or []
    assert any(re.match(r"duet-signaling\b", r) for r in requirements)
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in importlib.metadata.requires("duet-signaling") or []}
    assert names == {"tornado"}
    script = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "duet-signaling"]
    assert [(e.value, e.dist.name if e.dist else None) for e in script] == [
        ("duet_signaling.__main__:main", "duet-signaling")]
    assert (Path(sysconfig.get_path("scripts")) / "duet-signaling").is_file()


# ------------------------------------------------------------------ layout and py.typed
@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_each_package_lives_in_a_folder_of_its_name_with_py_typed(name: str) -> None:
    folder = Path(PACKAGES[name].__file__).resolve().parent
    assert folder.name == name
    assert folder.parent in {ROOT, ROOT / "signaling", ROOT / "extension"}
    assert (folder / "py.typed").is_file()


def test_the_extension_is_enabled_in_this_environment() -> None:
    """`make install` (editable) enables duet_jupyter in its venv, as a regular install does."""
    assert (Path(sys.prefix) / SERVER_CONFIG).is_file()
    jupyter = Path(sys.prefix) / "bin" / "jupyter"
    if not jupyter.exists():
        pytest.skip("jupyter_server is not installed in this environment")
    done = subprocess.run([str(jupyter), "server", "extension", "list"], capture_output=True, text=True, timeout=60)
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert re.search(r"^\s*duet_jupyter enabled\s*$", out, re.M), out
    assert re.search(r"^\s*duet_jupyter\s+OK\s*$", out, re.M), out


# ------------------------------------------------------------------ real builds
@pytest.mark.slow
def test_the_signaling_distribution_installs_alone_without_torch(tmp_path: Path) -> None:
    src = _copy(["signaling"], tmp_path / "src")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")

    def installed() -> Set[str]:
        listing = _run([python, "-m", "pip", "list", "--format=json"]).stdout
        return {d["name"].lower().replace("_", "-") for d in json.loads(listing)}

    before = installed()
    _run([python, "-m", "pip", "install", "--quiet", str(src / "signaling")], timeout=150)
    assert installed() - before == {"duet-signaling", "tornado"}

    check = (
        "import importlib.util, pathlib, duet_signaling\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('torch', 'aiortc', 'duet', 'duet_jupyter'))\n"
        "assert pathlib.Path(duet_signaling.__file__).parent.joinpath('py.typed').is_file()\n"
        "print(duet_signaling.__file__)\n"
    )
    where = _run([python, "-c", check], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    assert "usage: duet-signaling" in _run([str(venv / "bin" / "duet-signaling"), "--help"]).stdout

    # It serves there too: the listening line, then /health.
    proc = subprocess.Popen([str(venv / "bin" / "duet-signaling"), "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=_clean_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"duet-signaling listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        with urllib.request.urlopen(match.group(1) + "/health", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok", "rooms": 0, "peers": 0}
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0


@pytest.mark.slow
def test_the_main_wheel_holds_duet_and_duet_jupyter_with_py_typed_and_the_server_config(tmp_path: Path) -> None:
    src = _copy(["pyproject.toml", "README.md", "duet", "extension", "jupyter-config"], tmp_path / "src")
    out = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)], timeout=150)
    [wheel] = list(out.glob("*.whl"))
    assert wheel.name == f"duet_p2p-{duet.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"duet_p2p-{duet.__version__}.dist-info/METADATA").decode()
    tops = {n.split("/")[0] for n in names if not n.startswith("duet_p2p-")}
    assert tops == {"duet", "duet_jupyter"}
    assert {"duet/py.typed", "duet_jupyter/py.typed", "duet/owner/__init__.py",
            "duet/transport/__init__.py", "duet_jupyter/discovery.py"} <= names
    assert f"duet_p2p-{duet.__version__}.data/data/{SERVER_CONFIG}" in names
    assert re.search(r"^Requires-Dist: duet-signaling\b", metadata, re.M)
