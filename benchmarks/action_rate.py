"""The owner's cost per pipelined action, in process: `x + 1` on a local_pair, N times.

Baseline in the same run: the same `x + 1` on a local tensor (what the action itself costs).
What is left is Duet's work per action on both sides (encode, dispatch, lineage, shadow run).
CPU time (both sides share the process) is printed too: wall time on a shared VM swings by 30%.

    python benchmarks/action_rate.py [--n 15000]
"""
from __future__ import annotations

import argparse
import time

import torch

import duet
from duet.owner import host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15000)
    n = ap.parse_args().n
    local = torch.ones(4)
    start = time.perf_counter()
    for _ in range(n):
        local + 1
    local_us = (time.perf_counter() - start) / n * 1e6

    owner, scientist = duet.local_pair()
    try:
        host.wait_warm_up(timeout=120)  # one-time work per process, not per action
        x = scientist.send(torch.ones(4))
        for _ in range(500):  # warm up: first shadow runs, allocator
            x + 1
        scientist.ping(timeout=120)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(n):
            x + 1
        scientist.ping(timeout=300)
        remote_us = (time.perf_counter() - start) / n * 1e6
        cpu_us = (time.process_time() - cpu_start) / n * 1e6  # both sides: one process, all threads
    finally:
        scientist.close()
        owner.close()
    print(f"pipelined x + 1 on local_pair: {remote_us:.0f} us per action ({1e6 / remote_us:,.0f} /s), "
          f"{cpu_us:.0f} us of CPU (steadier on a shared VM); local torch: {local_us:.1f} us; "
          f"ratio {remote_us / local_us:.0f}x")


if __name__ == "__main__":
    main()
