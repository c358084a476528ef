"""`make demo`: the main job end to end, as two processes over WebRTC.

The owner runs in a child process with an embedded signaling service on
127.0.0.1; this process joins it as the scientist, computes remotely, asks
for a release that the owner's rule approves, and prints the result.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

OWNER_READY_TIMEOUT = 60.0


def run_owner() -> int:
    """The owner's side (child process): publish, add a rule, serve until stdin closes."""
    import torch

    import duet

    owner = duet.launch(name="St. Mary's", local_only=True, display=False)
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="patient ages")
    owner.requests.add_handler(action="accept", datasets=["ages"], max_elements=1)
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    for record in owner.audit.read():
        if record["event"] in ("decision", "release"):
            detail = record.get("by") or f"sha256 {record.get('sha256', '')[:16]}…"
            print(f"[owner] audit: {record['event']} ({detail})", file=sys.stderr, flush=True)
    owner.close()
    return 0


def _read_code(proc: subprocess.Popen) -> str:
    lines: "queue.Queue[str]" = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + OWNER_READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line.startswith("{"):
            return json.loads(line)["code"]
    raise TimeoutError(f"the owner process did not print its join code within {OWNER_READY_TIMEOUT} s")


def run_scientist() -> int:
    import torch

    import duet

    owner_proc = subprocess.Popen(
        [sys.executable, "-m", "duet.demo", "--owner"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        code = _read_code(owner_proc)
        print(f"owner is ready; joining with code {code}")
        start = time.perf_counter()
        scientist = duet.join(code, name="Dr. Lee", local_only=True)
        print(f"joined over WebRTC in {time.perf_counter() - start:.3f} s: {scientist}")
        print(scientist.store)
        ages = scientist.store["ages"]
        mean = (ages * 2 + 1).mean()
        print("remote result (a pointer, no value):", mean)
        value = mean.get(reason="mean age for the paper", timeout=60)
        print("released after the owner's rule approved it:", value)
        mine = (scientist.torch.tensor([1.0, 2.0]) * 3).get(timeout=30)
        print("own data comes back without approval:", mine)
        scientist.close()
        ok = torch.equal(value, torch.tensor(79.5)) and torch.equal(mine, torch.tensor([3.0, 6.0]))
    finally:
        if owner_proc.stdin:
            owner_proc.stdin.close()
        try:
            owner_proc.wait(20)
        except subprocess.TimeoutExpired:
            owner_proc.kill()
    print("demo", "succeeded" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    return run_owner() if "--owner" in sys.argv[1:] else run_scientist()


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # All links are closed and output flushed; skip native static destructors
    # (see README, known issues).
    os._exit(status)
