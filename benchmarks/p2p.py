"""Duet over WebRTC between two processes, each figure next to its baseline from the same run.

Baselines: a raw aiortc data channel between two processes (benchmarks/raw_aiortc.py). Duet's
fast path is off here, so this measures the data channel; benchmarks/fast_path.py measures it.
Figures and goals:
  join() call to ready            goal < 0.5 s      (baseline: raw createOffer -> channel open)
  .get() of a 64 MiB tensor        goal >= 0.85x     raw bulk MB/s
  pipelined small ops              goal >= 5x        raw one-message-per-send rate
  auto-approved small release RTT  goal < 5 ms p50

    python benchmarks/p2p.py [--mib 64] [--ops 20000] [--joins 5] [--releases 200]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:
    from . import _util
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]

_util.ensure_path()

import torch  # noqa: E402

import duet  # noqa: E402


def owner_child(mib: int) -> None:
    """The owner process: publish, auto-approve, serve until stdin closes."""
    owner = duet.launch(name="bench-owner", local_only=True, display=False, fast_path=False)  # the data channel
    owner.store.add(torch.rand(mib * 2**18, generator=torch.Generator().manual_seed(7)), name="big")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages")
    owner.requests.add_handler(action="accept", kind="release")
    print(json.dumps({"code": owner.code}), flush=True)
    sys.stdin.read()
    owner.close()


def measure_duet(mib: int, ops: int, joins: int, releases: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--owner", "--mib", str(mib)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        code = _util.read_json(proc.stdout, 60, "the owner's join code")["code"]
        join_times = []
        for _ in range(joins):
            start = time.perf_counter()
            s = duet.join(code, name="bench", local_only=True, fast_path=False)
            join_times.append(time.perf_counter() - start)
            s.close()
        scientist = duet.join(code, name="bench", local_only=True, fast_path=False)

        big = scientist.store["big"]
        start = time.perf_counter()
        value = big.get(reason="benchmark", timeout=300)
        get_s = time.perf_counter() - start
        assert value.numel() == mib * 2**18

        x = scientist.send(torch.zeros(1))
        scientist.ping()
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        scientist.ping(timeout=300)
        ops_s = time.perf_counter() - start
        assert x.get(timeout=30).item() == ops

        total = scientist.store["ages"].sum()
        total.get(timeout=30)
        rtts = []
        for _ in range(releases):
            start = time.perf_counter()
            total.get(timeout=30)
            rtts.append(time.perf_counter() - start)
        scientist.close()
        return {
            "join_s": statistics.median(join_times),
            "get_MBps": mib * 2**20 / get_s / 1e6,
            "get_s": get_s,
            "ops_per_s": ops / ops_s,
            "release_p50_ms": statistics.median(rtts) * 1000,
            "release_p95_ms": sorted(rtts)[int(0.95 * len(rtts)) - 1] * 1000,
        }
    finally:
        _util.stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--small", type=int, default=20000, help="raw small messages for the baseline")
    ap.add_argument("--joins", type=int, default=5)
    ap.add_argument("--releases", type=int, default=200)
    args = ap.parse_args()
    if args.owner:
        owner_child(args.mib)
        return
    import raw_aiortc  # type: ignore[import-not-found]

    raw = raw_aiortc.measure(bulk=args.mib << 20, small=args.small)
    d = measure_duet(args.mib, args.ops, args.joins, args.releases)
    print("Duet over WebRTC, two processes on 127.0.0.1, vs raw aiortc measured in this run")
    print(f"  join() to ready          {d['join_s'] * 1000:8.1f} ms   raw setup {raw['setup_s'] * 1000:6.1f} ms"
          f"   goal < 500 ms: {'met' if d['join_s'] < 0.5 else 'MISSED'}")
    ratio = d["get_MBps"] / raw["bulk_MBps"]
    print(f"  .get() {args.mib} MiB          {d['get_MBps']:8.1f} MB/s raw {raw['bulk_MBps']:6.1f} MB/s"
          f"   ratio {ratio:.2f} (goal >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})")
    ratio = d["ops_per_s"] / raw["small_msgps"]
    print(f"  pipelined small ops      {d['ops_per_s']:8.0f} /s   raw {raw['small_msgps']:6.0f} msg/s"
          f"   ratio {ratio:.1f} (goal >= 5: {'met' if ratio >= 5 else 'MISSED'})")
    print(f"  auto-approved release    {d['release_p50_ms']:8.2f} ms p50 ({d['release_p95_ms']:.2f} ms p95)"
          f"   goal < 5 ms: {'met' if d['release_p50_ms'] < 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see README, known issues
