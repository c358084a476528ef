"""A scientist in its own process, on the real network, for the NAT lab tests and benchmarks.

Joins with the ICE servers the signaling service offers (local_only=False, no ice_servers), makes a
small auto-approved release and a `.get()` of the owner's seeded "big" tensor (tests/procs/owner.py
--big-mb), then prints one JSON line and exits:

    {"join_s": ..., "release_s": ..., "release_warm_s": ..., "release_ok": true, "get_s": ..., "get_MBps": ..., "sha_ok": true,
     "route": "relay over tcp, relay -> srflx candidates, rtt 1.2 ms", "kind": "relay", "local_type": ...,
     "remote_type": ..., "protocol": ..., "rtt": ..., "fast_path": "up: TCP to ...", "fast_received": ...}

or, when joining or a transfer fails with a Duet error (or the join times out):

    {"error": "ConnectionFailed", "message": "...", "seconds": 9.8, "stage": "join"}

Exit status 0 in both cases; anything else is a crash.

    python -m tests.procs.scientist --code CODE [--get-mb 16]
    python -m tests.procs.scientist --code-from-stdin     # imports first, then reads the code
    python -m tests.procs.scientist --code CODE --local-only   # loopback ICE, for a baseline
"""
from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import sys
import time

import torch

import duet

AGES = [31.0, 45.0, 52.0, 29.0]  # what tests/procs/owner.py publishes as "ages"


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def seeded_big(mb: int) -> torch.Tensor:
    """The owner's "big" tensor, computed here the same way (tests/procs/owner.py)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.rand(mb * 2**18, generator=gen)


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def main(argv: list | None = None) -> int:
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    code = ap.add_mutually_exclusive_group(required=True)
    code.add_argument("--code")
    code.add_argument("--code-from-stdin", action="store_true", help="read the join code as the first stdin line")
    ap.add_argument("--name", default="Dr. Lee")
    ap.add_argument("--get-mb", type=int, default=16, help="size of the owner's 'big' tensor (its --big-mb); 0: skip")
    ap.add_argument("--timeout", type=float, default=30.0, help="join timeout")
    ap.add_argument("--releases", type=int, default=5, help="more small releases after the first (their median)")
    ap.add_argument("--fast-path-wait", type=float, default=0.0,
                    help="before the get, wait up to this many seconds for the fast path to be up or known down")
    ap.add_argument("--local-only", action="store_true",
                    help="loopback ICE (an owner on this machine without --network): a baseline for the network runs")
    args = ap.parse_args(argv)
    want = sha256_of(seeded_big(args.get_mb)) if args.get_mb else None
    join_code = args.code or sys.stdin.readline().strip()

    stage, started = "join", time.monotonic()
    scientist = None
    try:
        scientist = duet.join(join_code, name=args.name, local_only=args.local_only, timeout=args.timeout)
        result: dict = {"join_s": time.monotonic() - started}

        stage, t0 = "release", time.perf_counter()
        small = (scientist.store["ages"] * 2).get(reason="nat lab", timeout=30)
        result["release_s"] = time.perf_counter() - t0
        result["release_ok"] = small.tolist() == [2 * a for a in AGES]
        warm = []
        for _ in range(args.releases):
            t0 = time.perf_counter()
            ok = (scientist.store["ages"] * 2).get(reason="nat lab", timeout=30).tolist() == [2 * a for a in AGES]
            warm.append(time.perf_counter() - t0)
            result["release_ok"] = result["release_ok"] and ok
        if warm:
            result["release_warm_s"] = sorted(warm)[len(warm) // 2]

        if args.fast_path_wait:
            stage = "fast path"
            transport = scientist.session.transport
            result["fast_path_settled"] = transport.settled.wait(args.fast_path_wait)

        if args.get_mb:
            stage, t0 = "get", time.perf_counter()
            big = scientist.store["big"].get(reason="nat lab", timeout=120)
            seconds = time.perf_counter() - t0
            result.update(get_s=seconds, get_MBps=args.get_mb * 2**20 / seconds / 1e6, sha_ok=sha256_of(big) == want)

        stage = "route"
        route = scientist.connection
        result.update(route=str(route), kind=route.kind, local_type=route.local_type, remote_type=route.remote_type,
                      protocol=route.protocol, rtt=route.rtt, fast_path=route.fast_path,
                      fast_received=scientist.session.transport.stats().get("fast_received", 0))
        emit(**result)
    except (duet.DuetError, TimeoutError) as exc:
        emit(error=type(exc).__name__, message=str(exc), seconds=time.monotonic() - started, stage=stage)
    finally:
        if scientist is not None:
            scientist.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # As in tests/procs/owner.py: skip native static destructors (torch + aiortc codecs).
    os._exit(code)
