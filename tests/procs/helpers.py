"""Start and stop real processes for integration tests: signaling service and owner."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A child process whose stdout lines are read by a thread, so waits can time out."""

    def __init__(self, args: List[str], env: Optional[Dict[str, str]] = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=full_env
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stderr: List[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line)

    def next_line(self, timeout: float, startswith: str = "") -> str:
        """The next stdout line (starting with a prefix); fails with the child's stderr on timeout or exit."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no output within {timeout} s; stderr:\n{''.join(self.stderr[-30:])}") from None
            if line is None:
                raise RuntimeError(f"process exited ({self.popen.wait()}); stderr:\n{''.join(self.stderr[-30:])}")
            if line.startswith(startswith):
                return line

    def next_json(self, timeout: float) -> Dict[str, Any]:
        return json.loads(self.next_line(timeout, "{"))

    def stop(self, timeout: float = 10.0) -> int:
        """Close stdin (the polite stop), then terminate, then kill."""
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
                try:
                    return self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
        return self.popen.wait(5)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(5)


def start_signaling(*extra: str) -> tuple:
    """A real duet-signaling process on 127.0.0.1; returns (proc, url)."""
    proc = Proc([sys.executable, "-m", "duet_signaling", "--host", "127.0.0.1", "--port", "0", *extra])
    line = proc.next_line(20, "duet-signaling listening on ")
    return proc, line.rsplit(" ", 1)[-1]


def start_owner(*args: str, env: Optional[Dict[str, str]] = None) -> tuple:
    """A real owner process; returns (proc, first JSON line with the code)."""
    proc = Proc([sys.executable, "-m", "tests.procs.owner", *args], env=env)
    return proc, proc.next_json(60)


@contextlib.contextmanager
def scientist_of_owner_process(*owner_args: str, name: str) -> Iterator[Any]:
    """A signaling process, an owner process started with `owner_args`, and a scientist here joined to it.

    Everything is stopped afterwards, and the owner process must have exited cleanly.
    """
    import duet

    sig, url = start_signaling()
    owner_proc, info = start_owner("--signaling", url, *owner_args)
    scientist = duet.join(info["code"], name=name, local_only=True)
    try:
        yield scientist
    finally:
        scientist.close()
        rc = owner_proc.stop()
        sig.stop()
        assert rc == 0, "".join(owner_proc.stderr[-40:])
