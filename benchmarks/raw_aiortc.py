"""The baseline: a plain aiortc data channel between two processes on 127.0.0.1.

No Duet framing, coalescing or socket tuning: bulk data goes as 256 KiB
messages with simple `bufferedamountlow` backpressure, small messages as one
`send()` each. The only Duet code used is loopback-only ICE gathering (which
touches candidate gathering, not the data path) so no packet leaves 127.0.0.1.

    python benchmarks/raw_aiortc.py [--bulk-mib 64] [--small 50000]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Dict

try:
    from . import _util
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]

_util.ensure_path()

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402

from duet.transport.patches import set_local_description  # noqa: E402
from duet.transport.sdp import keep_loopback_candidates  # noqa: E402

MAX_MSG = 262144
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
VERBOSE = _util.VERBOSE


async def _read(proc_stdout: Any, timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _util.read_json, proc_stdout, timeout, what)


async def _wait_done(done: asyncio.Queue, timeout: float, what: str) -> float:
    """Wait for the child's confirmation; returns the CPU seconds it reports."""
    try:
        reply = await asyncio.wait_for(done.get(), timeout)
        return _util.parse_done(reply)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what}: the receiver did not confirm within {timeout} s") from None


async def offerer(proc: Any, bulk: int, small: int, small_size: int, timeout: float) -> Dict[str, float]:
    """Parent side: connect to the child, send bulk then small messages, time each."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        ch = pc.createDataChannel("raw", ordered=True)
        ch.bufferedAmountLowThreshold = LOW_WATER
        low = asyncio.Event()
        ch.on("bufferedamountlow", low.set)
        opened = asyncio.Event()
        ch.on("open", opened.set)
        done: asyncio.Queue = asyncio.Queue()
        ch.on("message", lambda m: done.put_nowait(m))

        await _read(proc.stdout, timeout, "the child's hello")
        t_setup = time.perf_counter()
        await set_local_description(pc, await pc.createOffer(), local_only=True)
        _util.write_json(proc.stdin, {"offer": pc.localDescription.sdp, "bulk": bulk,
                                      "small": small, "timeout": 5 * timeout})
        answer = await _read(proc.stdout, timeout, "the answer")
        await pc.setRemoteDescription(RTCSessionDescription(
            keep_loopback_candidates(answer["answer"]), "answer"))
        await asyncio.wait_for(opened.wait(), timeout)
        setup_s = time.perf_counter() - t_setup
        await asyncio.wait_for(done.get(), timeout)  # "ready": the child attached its handlers

        # Bulk: 256 KiB messages, keep bufferedAmount under the high watermark.
        payload = bytes(MAX_MSG)
        n_msgs = (bulk + MAX_MSG - 1) // MAX_MSG
        chunks = [payload[: min(MAX_MSG, bulk - i * MAX_MSG)] for i in range(n_msgs)]
        t0 = time.perf_counter()
        c0 = time.process_time()
        for c in chunks:
            while ch.bufferedAmount > HIGH_WATER:
                low.clear()
                await asyncio.wait_for(low.wait(), timeout)
            ch.send(c)
        bulk_child_cpu = await _wait_done(done, timeout, "bulk")
        bulk_s = time.perf_counter() - t0
        bulk_cpu = time.process_time() - c0

        # Small: one send() per message, no coalescing.
        msg = bytes(small_size)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for _ in range(small):
            ch.send(msg)
        try:
            small_child_cpu = await _wait_done(done, 3 * timeout, "small messages")
            small_s = time.perf_counter() - t0
        except TimeoutError as exc:
            # aiortc sometimes stalls for minutes on this burst (dropped
            # datagrams, 1 s retransmission timeouts); report it, keep going.
            print(f"raw baseline: {exc}", file=sys.stderr)
            small_child_cpu, small_s = float("nan"), float("inf")
        small_cpu = time.process_time() - c0
        return _util.figures(bulk, small, setup_s, bulk_s, bulk_cpu, bulk_child_cpu,
                             small_s, small_cpu, small_child_cpu)
    finally:
        await pc.close()


async def answerer() -> None:
    """Child side: answer the offer, count bytes then messages, confirm each phase."""
    _util.write_json(sys.stdout, {"hello": True})  # imports done: start the clock
    params = await _read(sys.stdin, 60, "the offer")
    bulk, small, timeout = params["bulk"], params["small"], params["timeout"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    gone = asyncio.Event()
    state = {"bytes": 0, "msgs": 0}
    cpu = _util.CpuClock()

    def on_datachannel(ch: Any) -> None:
        # Attach the handler synchronously: messages may follow at once.
        def on_message(m: bytes) -> None:
            if state["bytes"] < bulk:
                if state["bytes"] == 0:
                    cpu.start()
                state["bytes"] += len(m)
                if state["bytes"] >= bulk:
                    ch.send(cpu.done())
            else:
                if state["msgs"] == 0:
                    cpu.start()
                state["msgs"] += 1
                if VERBOSE and state["msgs"] % 5000 == 0:
                    print(f"child {time.perf_counter():.2f} {state['msgs']}", file=sys.stderr)
                if state["msgs"] == small:
                    ch.send(cpu.done())
        ch.on("message", on_message)
        ch.on("close", gone.set)
        ch.send(b"ready")

    pc.on("datachannel", on_datachannel)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            gone.set()

    await pc.setRemoteDescription(RTCSessionDescription(
        keep_loopback_candidates(params["offer"]), "offer"))
    await set_local_description(pc, await pc.createAnswer(), local_only=True)
    _util.write_json(sys.stdout, {"answer": pc.localDescription.sdp})
    try:
        # Stay until the parent closes: closing right after the confirmation
        # could drop it (it may still need an SCTP retransmission).
        await asyncio.wait_for(gone.wait(), timeout)
    finally:
        await pc.close()


def measure(bulk: int = 64 << 20, small: int = 50000, small_size: int = 100,
            timeout: float = 180.0) -> Dict[str, float]:
    """Run the raw baseline in a child process; returns setup_s, bulk_MBps, small_msgps."""
    proc = _util.spawn([__file__, "--child"])
    try:
        return asyncio.run(offerer(proc, bulk, small, small_size, timeout))
    finally:
        _util.stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bulk-mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=50000)
    ap.add_argument("--small-size", type=int, default=100)
    args = ap.parse_args()
    if args.child:
        asyncio.run(answerer())
        return
    r = measure(args.bulk_mib << 20, args.small, args.small_size)
    print("raw aiortc, two processes, 127.0.0.1")
    print(f"  setup createOffer->open  {r['setup_s'] * 1000:8.1f} ms")
    print(f"  bulk {args.bulk_mib} MiB             {r['bulk_MBps']:8.2f} MB/s ({r['bulk_s']:.2f} s)")
    print(f"  small {args.small} x {args.small_size} B    {r['small_msgps']:8.0f} msg/s ({r['small_s']:.2f} s)")
    print(f"  CPU s per 64 MiB: sender {r['bulk_cpu_tx'] * 64 * 2**20 / (args.bulk_mib << 20):.2f}"
          f" receiver {r['bulk_cpu_rx'] * 64 * 2**20 / (args.bulk_mib << 20):.2f}")


if __name__ == "__main__":
    main()
