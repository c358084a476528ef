"""WebRtcTransport against the raw aiortc baseline, both measured in this run.

Two processes on 127.0.0.1 in each case (the parent sends, a child receives
and confirms). For Duet the parent sends from its main thread, as a notebook
cell would, while networking runs on the runtime loop thread. Rounds
alternate raw and Duet so that load from elsewhere on the machine hits both;
the median of each figure is reported.

    python benchmarks/transport_throughput.py [--rounds 1] [--bulk-mib 64] [--small 50000]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from typing import Any, Dict, List

try:
    from . import _util, raw_aiortc
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]
    import raw_aiortc  # type: ignore[no-redef]

_util.ensure_path()

from duet import runtime  # noqa: E402
from duet.transport.ice import IceConfig  # noqa: E402
from duet.transport.webrtc import RtcPeer  # noqa: E402


def duet_measure(bulk: int = 64 << 20, small: int = 50000, small_size: int = 100,
                 timeout: float = 180.0, **transport_options: Any) -> Dict[str, float]:
    """Parent side over WebRtcTransport: setup, one bulk message, many small ones."""
    proc = _util.spawn([__file__, "--child"])
    peer = None
    try:
        replies: List[bytes] = []
        got = threading.Condition()

        def on_message(m: bytes) -> None:
            with got:
                replies.append(bytes(m))
                got.notify_all()

        def wait_reply(n: int, what: str) -> float:
            with got:
                if not got.wait_for(lambda: len(replies) >= n, timeout):
                    raise TimeoutError(f"{what}: no confirmation within {timeout} s")
                return _util.parse_done(replies[n - 1]) if n > 1 else 0.0

        _util.read_json(proc.stdout, timeout, "the child's hello")

        async def connect() -> Any:
            nonlocal peer
            t0 = time.perf_counter()
            peer = await RtcPeer.create(IceConfig(local_only=True), **transport_options)
            offer = await peer.create_offer()
            _util.write_json(proc.stdin, {"offer": offer, "bulk": bulk, "small": small,
                                          "options": transport_options})
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(
                None, _util.read_json, proc.stdout, timeout, "the answer")
            await peer.accept_answer(answer["answer"])
            tr = await peer.wait_open(timeout)
            return tr, time.perf_counter() - t0

        tr, setup_s = runtime.run(connect(), timeout, "connect")
        tr.set_handlers(on_message, lambda exc: None)
        wait_reply(1, "ready")

        payload = bytes(bulk)  # one message, as a serialized tensor would be
        t0 = time.perf_counter()
        c0 = time.process_time()
        tr.send(payload)
        bulk_child_cpu = wait_reply(2, "bulk")
        bulk_s = time.perf_counter() - t0
        bulk_cpu = time.process_time() - c0
        del payload
        if _util.VERBOSE:
            print(f"duet sender after bulk: {tr.stats()}", file=sys.stderr)

        msg = bytes(small_size)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for _ in range(small):
            tr.send(msg)
        small_child_cpu = wait_reply(3, "small messages")
        small_s = time.perf_counter() - t0
        small_cpu = time.process_time() - c0
        return _util.figures(bulk, small, setup_s, bulk_s, bulk_cpu, bulk_child_cpu,
                             small_s, small_cpu, small_child_cpu)
    finally:
        if peer is not None:
            try:
                runtime.run(peer.close(), 10, "close")
            except Exception as exc:  # the figures matter more than a slow close
                print(f"(close: {exc!r})", file=sys.stderr)
        _util.stop(proc)


def child() -> None:
    """Child side: answer, count the bulk bytes then the small messages, confirm each."""
    runtime.loop()
    _util.write_json(sys.stdout, {"hello": True})  # imports done: start the clock
    params = _util.read_json(sys.stdin, 60, "the offer")
    bulk, small = params["bulk"], params["small"]
    finished = threading.Event()
    state = {"bytes": 0, "msgs": 0}

    async def answer() -> Any:
        peer = await RtcPeer.create(IceConfig(local_only=True), **params["options"])
        sdp = await peer.accept_offer(params["offer"])
        return peer, sdp

    peer, sdp = runtime.run(answer(), 30, "answer")
    _util.write_json(sys.stdout, {"answer": sdp})
    tr = runtime.run(peer.wait_open(30), 35, "open")

    cpu = _util.CpuClock()

    def on_message(m: bytes) -> None:
        if state["bytes"] < bulk:
            state["bytes"] += len(m)
            if state["bytes"] >= bulk:
                tr.send(cpu.done())
        else:
            if state["msgs"] == 0:
                cpu.start()
            state["msgs"] += 1
            if state["msgs"] == small:
                tr.send(cpu.done())

    first = {"seen": False}

    def progress(received: int, total: int) -> None:
        if not first["seen"]:
            first["seen"] = True
            cpu.start()

    tr.on_progress = progress  # the clock starts with the first chunk of the bulk message
    tr.set_handlers(on_message, lambda exc: finished.set())
    tr.send(b"ready")
    finished.wait(300)  # the parent closes the link when it is done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--bulk-mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=50000)
    ap.add_argument("--small-size", type=int, default=100)
    ap.add_argument("--high-water", type=int, default=None, help="bytes")
    ap.add_argument("--low-water", type=int, default=None, help="bytes")
    ap.add_argument("--socket-buffer", type=int, default=None, help="bytes; 0: aioice default")
    ap.add_argument("--cwnd-max", type=int, default=None, help="bytes; 0: no cap")
    ap.add_argument("--sack-every", type=int, default=None)
    ap.add_argument("--skip-raw", action="store_true", help="only measure Duet")
    args = ap.parse_args()
    if args.child:
        child()
        return
    bulk = args.bulk_mib << 20
    opts = {}
    if args.high_water:
        opts["high_water"] = args.high_water
    if args.low_water:
        opts["low_water"] = args.low_water
    if args.cwnd_max is not None:
        opts["cwnd_max"] = args.cwnd_max or None
    if args.sack_every is not None:
        opts["sack_every"] = args.sack_every
    if args.socket_buffer is not None:
        opts["socket_buffer"] = args.socket_buffer or None
    raw: List[Dict[str, float]] = []
    duet: List[Dict[str, float]] = []
    nan = float("nan")
    for i in range(args.rounds):
        if args.skip_raw:
            raw.append(_util.figures(bulk, args.small, nan, nan, nan, nan, nan, nan, nan))
        else:
            raw.append(raw_aiortc.measure(bulk, args.small, args.small_size))
        duet.append(duet_measure(bulk, args.small, args.small_size, **opts))
        for name, r in (("raw ", raw[-1]), ("duet", duet[-1])):
            print(f"round {i + 1} {name}: bulk {r['bulk_MBps']:6.2f} MB/s (CPU s sender "
                  f"{r['bulk_cpu_tx']:.2f}, receiver {r['bulk_cpu_rx']:.2f}); small "
                  f"{r['small_msgps']:7.0f} msg/s (CPU s {r['small_cpu_tx']:.2f}, "
                  f"{r['small_cpu_rx']:.2f}); setup {r['setup_s'] * 1000:.1f} ms", flush=True)

    def med(rows: List[Dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print()
    print(f"two processes, 127.0.0.1, aiortc 1.16 data channel; median of {args.rounds} round(s)")
    print(f"{'':40}{'raw aiortc':>12}{'WebRtcTransport':>17}{'ratio':>9}")
    rows = [
        (f"bulk {args.bulk_mib} MiB, MB/s", "bulk_MBps", 1.0, "{:.2f}"),
        ("  sender CPU s", "bulk_cpu_tx", 1.0, "{:.2f}"),
        ("  receiver CPU s", "bulk_cpu_rx", 1.0, "{:.2f}"),
        (f"small {args.small} x {args.small_size} B, msg/s", "small_msgps", 1.0, "{:.0f}"),
        ("  sender CPU s", "small_cpu_tx", 1.0, "{:.2f}"),
        ("  receiver CPU s", "small_cpu_rx", 1.0, "{:.2f}"),
        ("setup createOffer->open, ms", "setup_s", 1000.0, "{:.1f}"),
    ]
    for label, key, scale, f in rows:
        r, d = med(raw, key), med(duet, key)
        print(f"{label:40}{f.format(r * scale):>12}{f.format(d * scale):>17}"
              f"{_util.fmt_ratio(d, r):>9}")

if __name__ == "__main__":
    main()
