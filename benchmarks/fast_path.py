"""The fast path: `.get()` of a large tensor over direct TCP, next to its baselines from the same run.

The owner is a child process, the scientist this one. Three figures, all of the same bytes
between the same two processes on 127.0.0.1:

  raw TCP      the owner process sends the tensor's bytes on a plain socket (sendall of a
               memoryview), the scientist receives them with recv_into: the ceiling
  fast path    scientist.store["big"].get() with the fast path up (default)
  data channel the same .get() from a second owner launched with fast_path=False

Goals: fast path >= 0.25x raw TCP and >= 20x the data channel.

    python benchmarks/fast_path.py [--mib 256] [--dc-mib 256] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time

try:
    from . import _util
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]

_util.ensure_path()

import torch  # noqa: E402

import duet  # noqa: E402


def owner_child(mib: int, fast_path: bool) -> None:
    """Publish a seeded tensor, auto-approve, serve raw TCP copies of its bytes too, until stdin closes."""
    big = torch.rand(mib * 2**18, generator=torch.Generator().manual_seed(7))
    owner = duet.launch(name="bench-owner", local_only=True, display=False, fast_path=fast_path)
    owner.store.add(big, name="big")
    owner.requests.add_handler(action="accept", kind="release")
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(1)
    view = memoryview(big.numpy()).cast("B")

    def serve_raw() -> None:
        while True:
            conn, _ = raw.accept()
            with conn:
                conn.sendall(view)

    threading.Thread(target=serve_raw, daemon=True).start()
    print(json.dumps({"code": owner.code, "raw_port": raw.getsockname()[1]}), flush=True)
    sys.stdin.read()
    owner.close()


def raw_tcp(port: int, size: int) -> float:
    """Seconds to receive `size` bytes from the owner process on a plain socket, into a fresh buffer."""
    start = time.perf_counter()
    buf = bytearray(size)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                raise ConnectionError("the owner closed the raw socket early")
            got += n
    value = torch.frombuffer(buf, dtype=torch.float32)
    elapsed = time.perf_counter() - start
    assert value.numel() == size // 4
    return elapsed


def timed_gets(scientist: duet.Scientist, repeat: int, expected: torch.Tensor) -> list:
    times = []
    for _ in range(repeat):
        pointer = scientist.store["big"]
        start = time.perf_counter()
        value = pointer.get(reason="benchmark", timeout=600)
        times.append(time.perf_counter() - start)
        assert torch.equal(value, expected), "the fast path delivered different bytes"
        del value
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", choices=["fast", "slow"], help=argparse.SUPPRESS)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dc-mib", type=int, default=256, help="size for the data-channel figure (slow: ~25 s for 256)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.owner:
        owner_child(args.mib, fast_path=args.owner == "fast")
        return
    here = os.path.abspath(__file__)
    expected = torch.rand(args.mib * 2**18, generator=torch.Generator().manual_seed(7))
    size = args.mib << 20

    proc = _util.spawn([here, "--owner", "fast", "--mib", str(args.mib)])
    try:
        hello = _util.read_json(proc.stdout, 120, "the owner's join code")
        scientist = duet.join(hello["code"], name="bench", local_only=True)
        state = _util.wait_for_fast_path(scientist)
        if not state.startswith("up"):
            raise SystemExit(f"the fast path did not come up: {state}")
        scientist.store["big"][:4].get(timeout=60)  # warm up the request path
        raw_times, fast_times = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same state of the machine
            raw_times.append(raw_tcp(hello["raw_port"], size))
            fast_times += timed_gets(scientist, 1, expected)
        scientist.close()
    finally:
        _util.stop(proc)

    proc = _util.spawn([here, "--owner", "slow", "--mib", str(args.dc_mib)])
    try:
        hello = _util.read_json(proc.stdout, 120, "the owner's join code")
        scientist = duet.join(hello["code"], name="bench", local_only=True, fast_path=False)
        scientist.store["big"][:4].get(timeout=60)
        dc_expected = expected if args.dc_mib == args.mib else torch.rand(
            args.dc_mib * 2**18, generator=torch.Generator().manual_seed(7))
        dc_times = timed_gets(scientist, 1, dc_expected)
        scientist.close()
    finally:
        _util.stop(proc)

    raw_mbps = size / statistics.median(raw_times) / 1e6
    fast_mbps = size / statistics.median(fast_times) / 1e6
    dc_mbps = (args.dc_mib << 20) / dc_times[0] / 1e6
    print(f"Fast path: .get() of {args.mib} MiB between two processes on 127.0.0.1 (median of {args.repeat})")
    print(f"  raw TCP socket     {statistics.median(raw_times):7.3f} s  {raw_mbps:8.1f} MB/s")
    print(f"  fast path .get()   {statistics.median(fast_times):7.3f} s  {fast_mbps:8.1f} MB/s"
          f"   {fast_mbps / raw_mbps:.2f}x raw TCP (goal >= 0.25: {'met' if fast_mbps / raw_mbps >= 0.25 else 'MISSED'})")
    print(f"  data channel .get() {dc_times[0]:6.3f} s  {dc_mbps:8.1f} MB/s ({args.dc_mib} MiB)"
          f"   fast path is {fast_mbps / dc_mbps:.1f}x (goal >= 20: {'met' if fast_mbps / dc_mbps >= 20 else 'MISSED'})")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see README, known issues
