"""Helpers shared by the benchmarks: child processes and line-based JSON signaling.

The two peers of a benchmark are two processes (the realistic case: each has
its own interpreter and GIL). SDP moves over the child's stdin/stdout as one
JSON object per line; no signaling server and no network besides 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

VERBOSE = bool(os.environ.get("DUET_BENCH_VERBOSE"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_path() -> None:
    """Make `import duet` work when a benchmark runs as a plain script."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def spawn(args: List[str]) -> subprocess.Popen:
    """Start `python <args>` with pipes for signaling; stderr passes through."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=env, cwd=ROOT, text=True, bufsize=1)


def write_json(stream: Any, obj: Any) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def read_json(stream: Any, timeout: float, what: str = "a line") -> Any:
    """Read one JSON line with a timeout (a reader thread, so any stream works)."""
    box: List[Optional[str]] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise TimeoutError(f"no {what} within {timeout} s")
    line = box[0]
    if not line:
        raise EOFError(f"the other process closed its pipe while we waited for {what}")
    return json.loads(line)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Wait for a child to exit; kill it (by its own pid) if it does not."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:6.2f}x" if base > 0 else "   n/a"


class CpuClock:
    """CPU seconds of this process between start() and done() (all threads).

    Wall-clock figures on a shared machine swing with other load; CPU seconds
    per transfer show which side is the bottleneck and barely move.
    """

    def __init__(self) -> None:
        self.t0 = time.process_time()

    def start(self) -> None:
        self.t0 = time.process_time()

    def done(self) -> bytes:
        """The confirmation message, carrying the CPU seconds used."""
        return b"done %.4f" % (time.process_time() - self.t0)


def parse_done(reply: Any) -> float:
    parts = bytes(reply).split()
    if not parts or parts[0] != b"done":
        raise ValueError(f"unexpected confirmation {bytes(reply)[:40]!r}")
    return float(parts[1]) if len(parts) > 1 else float("nan")


def figures(bulk: int, small: int, setup_s: float, bulk_s: float, bulk_cpu: float,
            bulk_child_cpu: float, small_s: float, small_cpu: float,
            small_child_cpu: float) -> Dict[str, float]:
    """The figures one measurement returns (rates, times, CPU seconds per side)."""
    return {"setup_s": setup_s, "bulk_MBps": bulk / bulk_s / 1e6, "bulk_s": bulk_s,
            "bulk_cpu_tx": bulk_cpu, "bulk_cpu_rx": bulk_child_cpu,
            "small_msgps": small / small_s if small_s else float("nan"), "small_s": small_s,
            "small_cpu_tx": small_cpu, "small_cpu_rx": small_child_cpu}


def wait_for_fast_path(scientist: Any, timeout: float = 20.0) -> str:
    """The scientist's fast-path state once it has settled (up or down), or as it is after `timeout`."""
    settled = getattr(scientist.session.transport, "settled", None)  # (none without a fast path)
    if settled is not None:
        settled.wait(timeout)
    return str(scientist.connection.fast_path)
