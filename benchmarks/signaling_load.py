#!/usr/bin/env python
"""Load on the real signaling service: many concurrent WebSockets, many rooms pairing at once.

Starts ``python -m duet_signaling`` as a child process on 127.0.0.1, then from
this one asyncio process opens ``--rooms`` x (1 owner + ``--scientists``)
WebSocket connections (default 100 x 10 = 1,000) and holds them all open.
Then every room "pairs" at once: each scientist sends one SDP-sized payload
(``--payload`` bytes, default 3 KB) to its owner, and the owner answers that
peer with a payload of the same size. Latency is measured per relayed message
(send timestamp embedded in the payload; one process, one clock), from the
client's send to the other client's receive, so it includes both WebSocket
hops and the service's work.

Bounded: the number of messages is fixed (2 per scientist per ``--rounds``),
every wait has a timeout, and the whole run has ``--timeout``. The service is
stopped (by its own pid) at the end.

    python benchmarks/signaling_load.py [--rooms 100] [--scientists 9] [--payload 3000]

Afterwards ``--probes`` offer/answer pairs go one at a time (rooms in turn,
every connection still open): the relay's own latency, without the queueing
of the burst.

Prints connections held, messages relayed, p50/p95/p99/max relay latency (burst
and one at a time) and the service's RSS; exits 1 if any message was lost or the run timed out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from tornado.websocket import WebSocketClientConnection, websocket_connect

ROOT = Path(__file__).resolve().parents[1]


def status_kb(field: str, pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_fd_limit(needed: int) -> tuple:
    """Raise the soft RLIMIT_NOFILE towards `needed` (never above the hard limit); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def percentile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


class Service:
    """The real service as a child process; stopped by its own pid."""

    def __init__(self, max_connections: int, rooms: int, peers_per_room: int, python: str = sys.executable) -> None:
        args = [python, "-m", "duet_signaling", "--host", "127.0.0.1", "--port", "0",
                "--max-connections", str(max_connections), "--max-rooms", str(max(rooms, 1)),
                "--peers-per-room", str(peers_per_room), "--log-level", "WARNING",
                "--handshake-timeout-seconds", "60"]
        # The child needs file descriptors too: raise our soft limit first, it inherits it.
        env = {**os.environ, "PYTHONPATH": str(ROOT / "signaling") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      text=True, cwd=ROOT, env=env)
        self.url = ""

    async def started(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        assert self.popen.stdout is not None
        line = await asyncio.wait_for(loop.run_in_executor(None, self.popen.stdout.readline), timeout)
        if not line.startswith("duet-signaling listening on "):
            err = self.popen.stderr.read() if self.popen.poll() is not None and self.popen.stderr else ""
            raise RuntimeError(f"the signaling service did not start: {line!r} {err}")
        self.url = line.strip().rsplit(" ", 1)[-1]
        return self.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    def rss_kb(self) -> int:
        return status_kb("VmRSS", self.popen.pid)

    def hwm_kb(self) -> int:
        return status_kb("VmHWM", self.popen.pid)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait(5)


class Peer:
    """One client connection; received messages go to a queue, timestamps are checked at arrival."""

    def __init__(self, conn: WebSocketClientConnection, role: str, peer_id: str) -> None:
        self.conn = conn
        self.role = role
        self.peer_id = peer_id

    async def recv(self, timeout: float) -> Dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            raise ConnectionError(f"{self.role} connection closed by the service")
        return json.loads(raw)

    async def recv_op(self, op: str, timeout: float) -> Dict[str, Any]:
        """The next message with this op, skipping others (bounded by the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.001, deadline - time.monotonic()))
            if msg.get("op") == op:
                return msg
            if msg.get("op") in ("error", "room_closed"):
                raise RuntimeError(f"{self.role} got {msg}")


async def open_peer(url: str, room: str, role: str, timeout: float) -> Peer:
    conn = await asyncio.wait_for(websocket_connect(url, max_message_size=1 << 20), timeout)
    conn.write_message(json.dumps({"op": "join", "room": room, "role": role}))
    peer = Peer(conn, role, "")
    msg = await peer.recv_op("joined", timeout)
    peer.peer_id = msg["peer"]
    return peer


def payload(size: int, seq: int) -> str:
    """A sealed-looking body of `size` characters carrying a send timestamp."""
    head = f"{time.perf_counter():.9f}|{seq}|"
    return head + "A" * max(0, size - len(head))


def stamp(data: str) -> float:
    return float(data.split("|", 1)[0])


async def run_room(owner: Peer, scientists: List[Peer], size: int, rounds: int, timeout: float,
                   lat_offer: List[float], lat_answer: List[float], start: asyncio.Event) -> int:
    """All scientists of one room send an offer; the owner answers each. Returns messages relayed."""
    expected = len(scientists) * rounds
    by_id = {s.peer_id: s for s in scientists}

    async def owner_side() -> None:
        for _ in range(expected):
            msg = await owner.recv_op("msg", timeout)
            lat_offer.append(time.perf_counter() - stamp(msg["data"]))
            owner.conn.write_message(json.dumps({"op": "send", "to": msg["from"], "data": payload(size, 0)}))

    async def scientist_side(s: Peer) -> None:
        for r in range(rounds):
            s.conn.write_message(json.dumps({"op": "send", "data": payload(size, r)}))
            msg = await s.recv_op("msg", timeout)
            lat_answer.append(time.perf_counter() - stamp(msg["data"]))

    await start.wait()
    await asyncio.gather(owner_side(), *(scientist_side(s) for s in by_id.values()))
    return 2 * expected


async def load(rooms: int, scientists: int, size: int, rounds: int, timeout: float,
               probes: int = 200, connect_concurrency: int = 50) -> Dict[str, Any]:
    n_conns = rooms * (1 + scientists)
    limits = raise_fd_limit(n_conns * 2 + 256)
    service = Service(max_connections=n_conns + 16, rooms=rooms + 1, peers_per_room=scientists + 1)
    result: Dict[str, Any] = {"connections_wanted": n_conns, "fd_limit": limits[0]}
    peers: List[Peer] = []
    try:
        await service.started(30)
        result["service_rss_idle_kb"] = service.rss_kb()
        url = service.ws_url
        gate = asyncio.Semaphore(connect_concurrency)  # bounded connect bursts: a listen backlog is finite

        async def gated(room: str, role: str) -> Peer:
            async with gate:
                return await open_peer(url, room, role, timeout)

        t0 = time.perf_counter()
        room_ids = [secrets.token_hex(16) for _ in range(rooms)]
        owners = await asyncio.gather(*(gated(r, "owner") for r in room_ids))
        peers.extend(owners)
        sci_lists = await asyncio.gather(
            *(asyncio.gather(*(gated(r, "scientist") for _ in range(scientists))) for r in room_ids))
        for lst in sci_lists:
            peers.extend(lst)
        result["connect_seconds"] = time.perf_counter() - t0
        # Drain the owners' peer_joined notices before timing.
        for o in owners:
            for _ in range(scientists):
                await o.recv_op("peer_joined", timeout)
        result["connections_held"] = sum(1 for p in peers if p.conn.protocol is not None)
        result["service_rss_connected_kb"] = service.rss_kb()

        lat_offer: List[float] = []
        lat_answer: List[float] = []
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(run_room(o, sl, size, rounds, timeout, lat_offer, lat_answer, start))
                 for o, sl in zip(owners, sci_lists)]
        t1 = time.perf_counter()
        start.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
        result["pair_seconds"] = time.perf_counter() - t1
        errors = [d for d in done if isinstance(d, BaseException)]
        result["room_errors"] = [f"{type(e).__name__}: {e}" for e in errors[:5]]
        result["messages_expected"] = 2 * rooms * scientists * rounds
        result["messages_relayed"] = sum(d for d in done if isinstance(d, int))
        lat = sorted(lat_offer + lat_answer)
        result["latency_ms"] = {
            "p50": percentile(lat, 50) * 1e3, "p95": percentile(lat, 95) * 1e3,
            "p99": percentile(lat, 99) * 1e3, "max": (lat[-1] if lat else float("nan")) * 1e3,
            "count": len(lat),
        }
        # Then one message at a time (each room in turn), all connections still held: latency
        # of the relay itself, without the queueing of the burst above.
        lat_one: List[float] = []
        for i in range(probes):
            o, sl = owners[i % rooms], sci_lists[i % rooms]
            s = sl[(i // rooms) % len(sl)]
            s.conn.write_message(json.dumps({"op": "send", "data": payload(size, i)}))
            msg = await o.recv_op("msg", timeout)
            lat_one.append(time.perf_counter() - stamp(msg["data"]))
            o.conn.write_message(json.dumps({"op": "send", "to": msg["from"], "data": payload(size, i)}))
            msg = await s.recv_op("msg", timeout)
            lat_one.append(time.perf_counter() - stamp(msg["data"]))
        lat_one.sort()
        result["latency_one_ms"] = {
            "p50": percentile(lat_one, 50) * 1e3, "p99": percentile(lat_one, 99) * 1e3,
            "max": (lat_one[-1] if lat_one else float("nan")) * 1e3, "count": len(lat_one),
        }
        result["connections_held_after"] = sum(1 for p in peers if p.conn.protocol is not None)
        result["service_rss_peak_kb"] = service.hwm_kb()
        result["service_alive"] = service.popen.poll() is None
    finally:
        for p in peers:
            p.conn.close()
        await asyncio.sleep(0.1)
        result["service_exit"] = service.stop()
    return result


def report(r: Dict[str, Any]) -> str:
    lat = r.get("latency_ms", {})
    one = r.get("latency_one_ms", {})
    lines = [
        f"connections held   {r.get('connections_held', 0)} of {r['connections_wanted']} "
        f"(opened in {r.get('connect_seconds', float('nan')):.1f} s; fd soft limit {r['fd_limit']}); "
        f"still open after pairing: {r.get('connections_held_after', 0)}",
        f"messages relayed   {r.get('messages_relayed', 0)} of {r.get('messages_expected', 0)} "
        f"in {r.get('pair_seconds', float('nan')):.2f} s (all rooms pairing at once)",
        f"relay latency      p50 {lat.get('p50', float('nan')):.1f} ms  p95 {lat.get('p95', float('nan')):.1f} ms  "
        f"p99 {lat.get('p99', float('nan')):.1f} ms  max {lat.get('max', float('nan')):.1f} ms  "
        f"({lat.get('count', 0)} messages sent at once, client send -> client receive)",
        f"  one at a time    p50 {one.get('p50', float('nan')):.1f} ms  p99 {one.get('p99', float('nan')):.1f} ms  "
        f"max {one.get('max', float('nan')):.1f} ms  ({one.get('count', 0)} messages, every connection still open)",
        f"service RSS        {r.get('service_rss_idle_kb', 0) / 1024:.0f} MB idle, "
        f"{r.get('service_rss_connected_kb', 0) / 1024:.0f} MB with all connections, "
        f"peak {r.get('service_rss_peak_kb', 0) / 1024:.0f} MB",
    ]
    if r.get("room_errors"):
        lines.append("errors             " + "; ".join(r["room_errors"]))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--scientists", type=int, default=9, help="scientists per room (default %(default)s)")
    ap.add_argument("--payload", type=int, default=3000, help="bytes per relayed message (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="offer/answer exchanges per scientist")
    ap.add_argument("--probes", type=int, default=100, help="sequential offer/answer pairs after the burst")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on the whole run, seconds")
    args = ap.parse_args(argv)
    print(f"signaling load: {args.rooms} rooms x (1 owner + {args.scientists} scientists) = "
          f"{args.rooms * (1 + args.scientists)} WebSockets, {args.payload} B payloads, {args.rounds} round(s)",
          flush=True)
    try:
        r = asyncio.run(asyncio.wait_for(
            load(args.rooms, args.scientists, args.payload, args.rounds, args.timeout, args.probes), args.timeout + 60))
    except asyncio.TimeoutError:
        print(f"FAIL: the run did not finish within {args.timeout + 60:.0f} s")
        return 1
    print(report(r))
    ok = (r.get("messages_relayed") == r.get("messages_expected") and not r.get("room_errors")
          and r.get("connections_held") == r["connections_wanted"] and r.get("service_alive"))
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
