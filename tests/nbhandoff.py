"""Run a pair of notebooks, owner and scientist, side by side against a real signaling service.

The join-code handoff (see docs/notebooks.md):

1. A real `duet-signaling` process is started on 127.0.0.1; both kernels get
   its URL in DUET_SIGNALING_URL, which `duet.launch()` uses instead of its
   embedded service.
2. The owner's kernel runs with DUET_HANDOFF_FILE=<tmp>/join-code: its
   `duet.launch(...)` cell, unchanged, writes the join code there (mode 0600;
   `duet.widgets.display_owner` does it whenever that variable is set).
3. Once the file appears, the scientist's kernel starts with
   DUET_JOIN_CODE=<code>; the scientist notebook's join cell reads it with
   `os.environ.get("DUET_JOIN_CODE") or input(...)`.

Nothing else is injected: the cells run as a user runs them. The owner's
cells wait for each request with `owner.requests.wait_pending(timeout=...)`,
so the two notebooks meet in a fixed order without sleeps.

A federation's topic has several owner notebooks (owner-1, owner-2, ...): each writes its own
handoff file, and the scientist gets every code, in order, in DUET_JOIN_CODES.

Two ways to run a pair:

* `run_nbval_pair(topic, workdir)`: two `pytest --nbval` processes, outputs
  compared against the committed ones after the sanitizers in
  notebooks/nbval.cfg (what tests/test_notebooks.py does);
* `python -m tests.nbhandoff update hello statistics`: execute the pairs with
  nbclient and write the fresh, sanitized outputs into the notebooks (the new
  regression baseline; review the diff before committing).
"""
from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SANITIZE_CFG = NOTEBOOKS / "nbval.cfg"
TOPICS = ("hello", "statistics", "vae", "federated", "encrypted", "shared")


def owner_notebooks(topic: str) -> List[str]:
    """The owners' notebooks of a topic, by stem: "owner", or "owner-1", "owner-2", ... for a federation."""
    folder = NOTEBOOKS / topic
    several = sorted(p.stem for p in folder.glob("owner-*.ipynb"))
    return several or ["owner"]


def roles(topic: str) -> List[str]:
    return owner_notebooks(topic) + ["scientist"]
HANDOFF_TIMEOUT = 120.0
PAIR_TIMEOUT = 300.0
CELL_TIMEOUT = 180


@dataclass
class PairResult:
    """How the owners' notebooks (one, or several for a federation) and the scientist's ended."""

    owner_rcs: List[int]
    scientist_rc: int
    owner_outs: List[str]
    scientist_out: str

    @property
    def owner_rc(self) -> int:
        return next((rc for rc in self.owner_rcs if rc != 0), 0)

    @property
    def owner_out(self) -> str:
        return "\n".join(self.owner_outs)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.owner_rcs) and self.scientist_rc == 0

    def report(self) -> str:
        owners = "".join(f"--- owner notebook {i + 1} (exit {rc}) ---\n{out[-12000:]}\n"
                         for i, (rc, out) in enumerate(zip(self.owner_rcs, self.owner_outs)))
        return owners + f"--- scientist notebook (exit {self.scientist_rc}) ---\n{self.scientist_out[-12000:]}"


def sanitize_patterns(cfg: Path = SANITIZE_CFG) -> List[Tuple[str, str]]:
    """The (regex, replacement) pairs of nbval's sanitize file, in order."""
    parser = configparser.ConfigParser()
    parser.read(cfg, encoding="utf-8")
    return [(parser.get(s, "regex"), parser.get(s, "replace")) for s in parser.sections()]


def sanitize(text: str, patterns: List[Tuple[str, str]]) -> str:
    for regex, replace in patterns:
        text = re.sub(regex, replace, text)
    return text


def base_env(workdir: Path, role: str, signaling_url: str) -> Dict[str, str]:
    """A private config dir per role (identities, audit log), the signaling URL, no stray settings."""
    config = workdir / f"{role}-config"
    config.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}
    env.update({
        "DUET_CONFIG_DIR": str(config),
        "DUET_SIGNALING_URL": signaling_url,
        "PYTHONHASHSEED": "0",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "JUPYTER_PLATFORM_DIRS": "1",
    })
    return env


def wait_for_file(path: Path, timeout: float, alive: Optional[subprocess.Popen] = None) -> str:
    """The content of `path` once it exists (it is written atomically); bounded."""
    def written() -> bool:
        if alive is not None and alive.poll() is not None and not path.exists():
            raise RuntimeError(f"the owner's process exited ({alive.returncode}) before writing the join code")
        return path.exists()

    until(written, timeout, f"a join code in {path}")
    return path.read_text(encoding="utf-8").strip()


def start_signaling() -> Tuple[object, str]:
    from tests.procs.helpers import start_signaling as start

    return start()


def _spawn(args: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "w", encoding="utf-8")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)


def run_pair(topic: str, workdir: Path, owner_cmds: List[List[str]], scientist_cmd: List[str],
             timeout: float = PAIR_TIMEOUT) -> PairResult:
    """Start the owners' commands, hand their join codes to the scientist command, wait for all.

    The scientist gets the first code in DUET_JOIN_CODE and all of them, in order, in
    DUET_JOIN_CODES (comma-separated).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sig, url = start_signaling()
    owners: List[subprocess.Popen] = []
    scientist = None
    logs = [workdir / f"owner-{i + 1}.log" for i in range(len(owner_cmds))]
    scientist_log = workdir / "scientist.log"
    try:
        codes = []
        deadline = time.monotonic() + timeout
        for i, cmd in enumerate(owner_cmds):
            env = base_env(workdir, f"owner-{i + 1}", url)
            handoff = workdir / f"join-code-{i + 1}"
            env["DUET_HANDOFF_FILE"] = str(handoff)
            owners.append(_spawn(cmd, env, logs[i]))
            try:
                codes.append(wait_for_file(handoff, HANDOFF_TIMEOUT, alive=owners[-1]))
            except (TimeoutError, RuntimeError) as exc:
                rcs = [_finish(o, time.monotonic()) for o in owners]
                outs = [log.read_text() for log in logs[:len(owners)]]
                outs[-1] += f"\n[harness] {exc}"
                return PairResult(rcs, -1, outs, "(not started)")
        scientist_env = base_env(workdir, "scientist", url)
        scientist_env["DUET_JOIN_CODE"] = codes[0]
        scientist_env["DUET_JOIN_CODES"] = ",".join(codes)
        scientist = _spawn(scientist_cmd, scientist_env, scientist_log)
        s_rc = _finish(scientist, deadline)
        o_rcs = [_finish(o, deadline) for o in owners]
        return PairResult(o_rcs, s_rc, [log.read_text() for log in logs], scientist_log.read_text())
    finally:
        for proc in [scientist, *owners]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        sig.stop()  # type: ignore[attr-defined]


def nbval_cmd(notebook: Path) -> List[str]:
    return [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
        "--nbval", "--nbval-current-env", f"--nbval-cell-timeout={CELL_TIMEOUT}",
        "--nbval-sanitize-with", str(SANITIZE_CFG), str(notebook),
    ]


def run_nbval_pair(topic: str, workdir: Path) -> PairResult:
    folder = NOTEBOOKS / topic
    return run_pair(topic, workdir, [nbval_cmd(folder / f"{o}.ipynb") for o in owner_notebooks(topic)],
                    nbval_cmd(folder / "scientist.ipynb"))


# -- regenerating the committed outputs -------------------------------------------------
def execute_notebook(src: Path, dst: Path) -> None:
    """Run a notebook with nbclient (in this process's environment) and save it with outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(src.parent)}})
    client.execute()
    nbformat.write(nb, dst)


def clean_outputs(nb_path: Path, patterns: List[Tuple[str, str]]) -> None:
    """Sanitize what nbval sanitizes (codes, fingerprints) and drop widget state, so no secret is committed."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        # A widget-only output (the scientist's live get() status) appears only when a decision
        # takes a moment; nbval does not compare it, and without widget state it shows nothing.
        cell.outputs = [o for o in cell.get("outputs", [])
                        if set(o.get("data", {})) != {"application/vnd.jupyter.widget-view+json"}]
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = sanitize(out["text"], patterns)
            for key, value in list(out.get("data", {}).items()):
                if isinstance(value, str):
                    out["data"][key] = sanitize(value, patterns)
    nbformat.write(nb, nb_path)


def update(topic: str) -> PairResult:
    folder = NOTEBOOKS / topic
    with tempfile.TemporaryDirectory(prefix=f"duet-nb-{topic}-") as tmp:
        work = Path(tmp)
        outs = {role: work / f"{role}.ipynb" for role in roles(topic)}
        cmd = lambda role: [sys.executable, "-m", "tests.nbhandoff", "execute",  # noqa: E731
                            str(folder / f"{role}.ipynb"), str(outs[role])]
        result = run_pair(topic, work, [cmd(o) for o in owner_notebooks(topic)], cmd("scientist"))
        if result.ok:
            patterns = sanitize_patterns()
            for role, path in outs.items():
                clean_outputs(path, patterns)
                (folder / f"{role}.ipynb").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        return result


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("update", help="re-run pairs and store their outputs as the new baseline")
    up.add_argument("topics", nargs="*", default=list(TOPICS))
    ex = sub.add_parser("execute", help="(internal) execute one notebook with nbclient")
    ex.add_argument("src", type=Path)
    ex.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "execute":
        execute_notebook(args.src, args.dst)
        return 0
    status = 0
    for topic in args.topics:
        result = update(topic)
        print(f"{topic}: {'updated' if result.ok else 'FAILED'}")
        if not result.ok:
            print(result.report())
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
