"""The signaling service and its client, over real sockets on 127.0.0.1.

Every wait is on an event with a timeout. Token refill and idle/ttl expiry read
the service's injected clock, which those tests move by hand instead of waiting;
client-side timeouts are bounded deadlines, never a sleep used as synchronization.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import pytest

from tests.clock import FakeClock
from tests.waiting import eventually as _eventually
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

import duet_signaling
from duet.errors import DuetError, SignalingError
from duet.signaling_client import SignalingClient, SignalingEvent, ws_endpoint
from duet_signaling import Limits, SignalingState, make_app, make_handlers, start

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

ROOM = "0123456789abcdef0123456789abcdef"
ROOM2 = "fedcba9876543210fedcba9876543210"
WAIT = 5.0  # upper bound for any single event we wait on


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    """Run one test body on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(**limits: Any) -> AsyncIterator[duet_signaling.RunningService]:
    service = await start("127.0.0.1", 0, Limits(**limits) if limits else None)
    try:
        yield service
    finally:
        await service.stop()


async def connect(service: Any, role: str, room: str = ROOM, timeout: float = WAIT) -> SignalingClient:
    return await SignalingClient.connect(service.url, room, role, timeout=timeout)


async def expect(client: SignalingClient, kind: str, timeout: float = WAIT) -> SignalingEvent:
    event = await client.recv(timeout=timeout)
    assert event.kind == kind, event
    return event


async def expect_closed(client: SignalingClient, timeout: float = WAIT) -> SignalingError:
    with pytest.raises(SignalingError) as info:
        await client.recv(timeout=timeout)
    assert client.closed
    return info.value



async def eventually(predicate: Any, timeout: float = WAIT) -> None:
    """Server-side state trails what the client already saw by a loop turn; wait for it, bounded."""
    await _eventually(predicate, timeout)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- relay
def test_relay_both_directions_and_peer_events() -> None:
    async def body() -> None:
        async with serving() as svc:
            owner = await connect(svc, "owner")
            assert owner.peer_id == "owner"
            a = await connect(svc, "scientist")
            joined_a = await expect(owner, "peer_joined")
            b = await connect(svc, "scientist")
            joined_b = await expect(owner, "peer_joined")
            assert (joined_a.peer, joined_b.peer) == (a.peer_id, b.peer_id)
            assert len({"owner", a.peer_id, b.peer_id}) == 3

            await a.send("sealed-from-a")
            await b.send("sealed-from-b")
            got = [await expect(owner, "msg"), await expect(owner, "msg")]
            assert {(e.peer, e.data) for e in got} == {(a.peer_id, "sealed-from-a"), (b.peer_id, "sealed-from-b")}

            # Owner messages go only to the addressed scientist.
            await owner.send("for-b", to=b.peer_id)
            await owner.send("for-a", to=a.peer_id)
            ev_a, ev_b = await expect(a, "msg"), await expect(b, "msg")
            assert (ev_a.peer, ev_a.data) == ("owner", "for-a")
            assert (ev_b.peer, ev_b.data) == ("owner", "for-b")

            # Unicode and JSON-looking payloads pass through untouched.
            tricky = 'é中\\"}{"op":"join"\n\x00'
            await a.send(tricky)
            assert (await expect(owner, "msg")).data == tricky

            await a.close()
            left = await expect(owner, "peer_left")
            assert left.peer == a.peer_id
            with pytest.raises(SignalingError):
                await a.send("after close")
            assert svc.state.stats()["peers"] == 2
            await b.close()
            await owner.close()

    run(body())


def test_owner_leaving_closes_room_for_every_scientist() -> None:
    async def body() -> None:
        async with serving() as svc:
            owner = await connect(svc, "owner")
            scientists = [await connect(svc, "scientist") for _ in range(3)]
            for _ in scientists:
                await expect(owner, "peer_joined")
            await owner.close()
            for s in scientists:
                ev = await expect(s, "room_closed")
                assert ev.code == "owner_left"
                err = await expect_closed(s)
                assert "owner left" in str(err)
            assert svc.state.stats()["rooms"] == 0
            with pytest.raises(SignalingError) as info:
                await connect(svc, "scientist")
            assert info.value.code == "no_room"  # type: ignore[attr-defined]

    run(body())


def test_no_peer_is_not_fatal() -> None:
    async def body() -> None:
        async with serving() as svc:
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await owner.send("lost", to="deadbeef")
            err = await expect(owner, "error")
            assert err.code == "no_peer"
            await owner.send("found", to=sci.peer_id)
            assert (await expect(sci, "msg")).data == "found"
            assert not owner.closed

    run(body())


# ----------------------------------------------------------------- join errors
def test_no_room_fails_fast_with_clear_message() -> None:
    async def body() -> None:
        async with serving() as svc:
            t0 = time.monotonic()
            with pytest.raises(SignalingError) as info:
                await connect(svc, "scientist", room=ROOM2)
            assert time.monotonic() - t0 < 2.0
            assert info.value.code == "no_room"  # type: ignore[attr-defined]
            assert "join code is wrong, expired, or the owner has left" in str(info.value)
            assert isinstance(info.value, DuetError) and isinstance(info.value, ConnectionError)
            await eventually(lambda: svc.state.stats()["connections"] == 0)

    run(body())


def test_room_exists_and_first_owner_keeps_working() -> None:
    async def body() -> None:
        async with serving() as svc:
            owner = await connect(svc, "owner")
            with pytest.raises(SignalingError) as info:
                await connect(svc, "owner")
            assert info.value.code == "room_exists"  # type: ignore[attr-defined]
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await sci.send("still here")
            assert (await expect(owner, "msg")).data == "still here"

    run(body())


def test_room_full() -> None:
    async def body() -> None:
        async with serving(peers_per_room=3) as svc:
            owner = await connect(svc, "owner")
            first = [await connect(svc, "scientist") for _ in range(2)]
            with pytest.raises(SignalingError) as info:
                await connect(svc, "scientist")
            assert info.value.code == "room_full"  # type: ignore[attr-defined]
            for _ in first:
                await expect(owner, "peer_joined")
            await first[0].close()
            assert (await expect(owner, "peer_left")).peer == first[0].peer_id
            again = await connect(svc, "scientist")  # a slot is free again
            assert (await expect(owner, "peer_joined")).peer == again.peer_id

    run(body())


def test_too_many_rooms_and_connections() -> None:
    async def body() -> None:
        async with serving(max_rooms=1) as svc:
            await connect(svc, "owner", room=ROOM)
            with pytest.raises(SignalingError) as info:
                await connect(svc, "owner", room=ROOM2)
            assert info.value.code == "too_many_rooms"  # type: ignore[attr-defined]
        async with serving(max_connections=2) as svc:
            owner = await connect(svc, "owner")
            await connect(svc, "scientist")
            with pytest.raises(SignalingError) as info:
                await connect(svc, "scientist")
            assert info.value.code == "too_many_connections"  # type: ignore[attr-defined]
            assert (await expect(owner, "peer_joined"))

    run(body())


# -------------------------------------------------------------------- limits
def test_too_large_message_is_refused_clearly() -> None:
    async def body() -> None:
        async with serving(max_message_bytes=1024) as svc:
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await sci.send("x" * 900)  # fits, with the envelope
            assert (await expect(owner, "msg")).data == "x" * 900
            await sci.send("x" * 2000)
            err = await expect(sci, "error")
            assert err.code == "too_large"
            closed = await expect_closed(sci)
            assert closed.code == "too_large"  # type: ignore[attr-defined]
            assert (await expect(owner, "peer_left")).peer == sci.peer_id
            assert svc.state.stats()["counters"]["messages_relayed"] == 1

            # Far beyond the limit tornado itself drops the frame; still a clear error.
            big = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await big.send("y" * 50_000)
            closed = await expect_closed(big)
            assert closed.code == "too_large"  # type: ignore[attr-defined]
            assert "larger than the service accepts" in str(closed)

    run(body())


def test_rate_limit_drops_messages_but_keeps_connection() -> None:
    async def body() -> None:
        async with serving(messages_per_second=20, burst_messages=5) as svc:
            clock = svc.state.clock = FakeClock()  # tokens refill only when the test moves time
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")

            async def burst(prefix: str, sent: int, relayed: int) -> None:
                for i in range(sent):
                    await sci.send(f"{prefix}{i}")
                for _ in range(sent - relayed):
                    assert (await expect(sci, "error")).code == "rate_limited"
                got = [(await expect(owner, "msg")).data for _ in range(relayed)]
                assert got == [f"{prefix}{i}" for i in range(relayed)], "the first ones pass, in order"

            await burst("m", 40, 4)  # a burst of 5, of which the join took one
            clock.advance(0.125)  # 2.5 tokens at 20 per second (a step exact in binary)
            await burst("late", 5, 2)
            clock.advance(60)  # refills up to the burst, not beyond
            await burst("after", 8, 5)
            assert not sci.closed
            counters = svc.state.stats()["counters"]
            assert counters["errors_sent"] == 36 + 3 + 3 and counters["messages_relayed"] == 4 + 2 + 5

    run(body())


def test_sustained_flooding_gets_the_connection_closed() -> None:
    async def body() -> None:
        async with serving(messages_per_second=0.5, burst_messages=2) as svc:
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            with contextlib.suppress(SignalingError):
                for i in range(300):
                    await sci.send(f"flood{i}")
            while True:  # drain rate_limited errors until the connection ends
                try:
                    ev = await sci.recv(timeout=WAIT)
                except SignalingError as exc:
                    assert exc.code == "rate_limited"  # type: ignore[attr-defined]
                    break
                assert ev.kind == "error" and ev.code == "rate_limited"
            relayed = []
            while True:
                ev = await owner.recv(timeout=WAIT)
                if ev.kind == "peer_left":
                    assert ev.peer == sci.peer_id
                    break
                relayed.append(ev.data)
            # The join took one of the 2 burst tokens; a slow run may refill one more.
            assert relayed in (["flood0"], ["flood0", "flood1"])

    run(body())


def test_idle_room_expires() -> None:
    async def body() -> None:
        async with serving(room_idle_seconds=30) as svc:
            clock = svc.state.clock = FakeClock()  # the periodic sweep reads it
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            clock.advance(29.9)  # the scientist's join was the last activity
            assert svc.state.sweep() == 0 and svc.state.stats()["rooms"] == 1
            clock.advance(0.1)
            ev = await expect(sci, "room_closed")
            assert ev.code == "expired"
            assert (await expect(owner, "room_closed")).code == "expired"
            assert "expired" in str(await expect_closed(sci))
            await expect_closed(owner)
            assert svc.state.stats()["rooms"] == 0
            assert svc.state.stats()["counters"]["rooms_expired"] == 1
            with pytest.raises(SignalingError) as info:
                await connect(svc, "scientist")
            assert info.value.code == "no_room"  # type: ignore[attr-defined]

    run(body())


def test_room_ttl_expires_regardless_of_traffic() -> None:
    async def body() -> None:
        async with serving(room_ttl_seconds=100, room_idle_seconds=30) as svc:
            clock = svc.state.clock = FakeClock()
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            for i in range(3):  # traffic every 25 s keeps the room from going idle ...
                clock.advance(25)
                await sci.send(f"still here {i}")
                assert (await expect(owner, "msg")).data == f"still here {i}"
                assert svc.state.sweep() == 0 and svc.state.stats()["rooms"] == 1
            clock.advance(25)  # ... but not past its lifetime, 100 s after it opened
            ev = await expect(sci, "room_closed")
            assert ev.code == "expired"
            assert (await expect(owner, "room_closed")).code == "expired"
            assert svc.state.stats()["rooms"] == 0

    run(body())


def test_sweep_keeps_active_rooms() -> None:
    # Driven with explicit clock values, so no timing is involved.
    async def body() -> None:
        async with serving(room_idle_seconds=100, room_ttl_seconds=1000) as svc:
            await connect(svc, "owner")
            now = time.monotonic()
            assert svc.state.sweep(now + 50) == 0
            assert svc.state.stats()["rooms"] == 1
            assert svc.state.sweep(now + 101) == 1
            assert svc.state.stats()["rooms"] == 0

    run(body())


def test_handshake_timeout_and_bad_first_messages() -> None:
    async def raw_exchange(svc: Any, frame: Optional[Any]) -> list:
        conn = await websocket_connect(ws_endpoint(svc.url))
        if frame is not None:
            await conn.write_message(frame, binary=isinstance(frame, bytes))
        frames = []
        while True:
            msg = await asyncio.wait_for(conn.read_message(), WAIT)
            if msg is None:
                return frames
            frames.append(json.loads(msg))

    async def body() -> None:
        async with serving(handshake_timeout_seconds=0.2) as svc:
            frames = await raw_exchange(svc, None)
            assert [f["code"] for f in frames] == ["handshake_timeout"]
        async with serving() as svc:
            hostile = [
                "",
                "null",
                "[]",
                "{not json",
                '{"op": 1}',
                '{"op": "send", "data": "x"}',
                '{"op": "join"}',
                '{"op": "join", "room": "0123456789ABCDEF", "role": "owner"}',
                '{"op": "join", "room": "0123456789abcde", "role": "owner"}',
                '{"op": "join", "room": "' + "a" * 65 + '", "role": "owner"}',
                '{"op": "join", "room": "0123456789abcdef", "role": "admin"}',
                "[" * 5000 + "]" * 5000,
                b"\x00binary",
            ]
            for frame in hostile:
                frames = await raw_exchange(svc, frame)
                assert [f["op"] for f in frames] == ["error"], frame
                assert frames[0]["code"] == "bad_message", frame
            await eventually(lambda: svc.state.stats()["connections"] == 0)
            assert svc.state.health()["status"] == "ok"

    run(body())


def test_bad_message_after_join_is_not_fatal() -> None:
    async def body() -> None:
        async with serving() as svc:
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await sci._conn.write_message('{"op":"send","data":5}')
            assert (await expect(sci, "error")).code == "bad_message"
            await sci._conn.write_message('{"op":"join","room":"%s","role":"owner"}' % ROOM)
            assert (await expect(sci, "error")).code == "bad_message"
            await sci.send("ok")
            assert (await expect(owner, "msg")).data == "ok"

    run(body())


# ------------------------------------------------------- health, stats, logs
def test_health_endpoint_json() -> None:
    async def body() -> None:
        async with serving() as svc:
            http = AsyncHTTPClient(force_instance=True)
            try:
                resp = await http.fetch(svc.url + "/health", request_timeout=WAIT)
                assert resp.headers["Content-Type"].startswith("application/json")
                assert json.loads(resp.body) == {"status": "ok", "rooms": 0, "peers": 0}
                owner = await connect(svc, "owner")
                await connect(svc, "scientist")
                await expect(owner, "peer_joined")
                resp = await http.fetch(svc.url + "/health", request_timeout=WAIT)
                assert json.loads(resp.body) == {"status": "ok", "rooms": 1, "peers": 2}
            finally:
                http.close()

    run(body())


def test_prefix_mount_and_make_handlers() -> None:
    async def body() -> None:
        state = SignalingState(Limits(max_rooms=7))
        specs = make_handlers(state, prefix="/duet/signaling/")
        assert [s[0] for s in specs] == [r"/duet/signaling/ws", r"/duet/signaling/health"]
        assert all(s[2]["state"] is state for s in specs)
        app = make_app(state=state, prefix="/duet/signaling")
        assert app.settings["duet_signaling_state"] is state
        with pytest.raises(ValueError):
            make_app(state=state, limits=Limits(max_rooms=8))

        svc = await start("127.0.0.1", 0, prefix="/sig")
        try:
            assert svc.url == f"http://127.0.0.1:{svc.port}/sig"
            owner = await SignalingClient.connect(svc.url + "/", ROOM, "owner", timeout=WAIT)
            sci = await SignalingClient.connect(svc.url.replace("http", "ws"), ROOM, "scientist", timeout=WAIT)
            await expect(owner, "peer_joined")
            await sci.send("via prefix")
            assert (await expect(owner, "msg")).data == "via prefix"
            with pytest.raises(SignalingError) as info:  # wrong prefix: a clear error, not a hang
                await SignalingClient.connect(f"http://127.0.0.1:{svc.port}", ROOM, "scientist", timeout=WAIT)
            assert "404" in str(info.value)
        finally:
            await svc.stop()

    run(body())


def test_stats_and_logs_never_contain_payloads_or_room_ids(caplog: pytest.LogCaptureFixture) -> None:
    secret_payload = "SEALED-PAYLOAD-7f3a9c"

    async def body() -> dict:
        async with serving(room_idle_seconds=0.3) as svc:
            owner = await connect(svc, "owner")
            sci = await connect(svc, "scientist")
            await expect(owner, "peer_joined")
            await sci.send(secret_payload)
            await expect(owner, "msg")
            await owner.send(secret_payload * 2, to=sci.peer_id)
            await expect(sci, "msg")
            await owner.send(secret_payload, to="nosuchpeer")
            await expect(owner, "error")
            stats = svc.state.stats()
            await expect(sci, "room_closed")  # expiry path logs too
            return stats

    with caplog.at_level(logging.DEBUG):
        stats = run(body())
    assert stats["rooms"] == 1 and stats["peers"] == 2 and stats["connections"] == 2
    assert stats["limits"]["max_message_bytes"] == 65536
    assert stats["counters"]["messages_relayed"] == 2
    dumped = json.dumps(stats)
    assert secret_payload not in dumped and ROOM not in dumped and ROOM[:16] not in dumped
    assert "room 012345..." in caplog.text  # logging did happen ...
    assert secret_payload not in caplog.text  # ... but never the payload
    assert ROOM[:16] not in caplog.text  # ... nor a usable room id


# ---------------------------------------------------------------- client side
def test_unreachable_service_fails_quickly() -> None:
    async def body() -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        with pytest.raises(SignalingError) as info:
            await SignalingClient.connect(url, ROOM, "scientist", timeout=5)
        assert time.monotonic() - t0 < 3.0
        assert str(info.value).startswith(f"could not reach the signaling service at {url}")

    run(body())


def test_silent_server_times_out_within_timeout() -> None:
    async def body() -> None:
        # Accepts TCP but never speaks HTTP: the client must give up on time.
        held: list = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            t0 = time.monotonic()
            with pytest.raises(SignalingError) as info:
                await SignalingClient.connect(f"http://127.0.0.1:{port}", ROOM, "owner", timeout=0.5)
            assert 0.4 <= time.monotonic() - t0 < 3.0
            assert "timed out" in str(info.value)
        finally:
            for w in held:
                w.close()
            server.close()
            await server.wait_closed()

    run(body())


def test_client_argument_checks_and_url_forms() -> None:
    assert ws_endpoint("http://127.0.0.1:1234") == "ws://127.0.0.1:1234/ws"
    assert ws_endpoint("https://example.org/a/b/") == "wss://example.org/a/b/ws"
    assert ws_endpoint("ws://127.0.0.1:9") == "ws://127.0.0.1:9/ws"
    assert ws_endpoint("wss://h:1/p") == "wss://h:1/p/ws"
    for bad in ("ftp://h/", "127.0.0.1:8765", ""):
        with pytest.raises(SignalingError):
            ws_endpoint(bad)

    async def body() -> None:
        with pytest.raises(ValueError):
            await SignalingClient.connect("http://127.0.0.1:1", "NOT-HEX", "owner")
        with pytest.raises(ValueError):
            await SignalingClient.connect("http://127.0.0.1:1", ROOM, "admin")
        async with serving() as svc:
            async with await connect(svc, "owner") as owner:
                with pytest.raises(ValueError):
                    await owner.send("no recipient")
                with pytest.raises(TimeoutError):
                    await owner.recv(timeout=0.05)
            assert owner.closed
            with pytest.raises(SignalingError):
                await owner.recv(timeout=1)
            with pytest.raises(SignalingError):  # stays closed
                await owner.recv(timeout=1)

    run(body())


def test_stop_closes_clients_and_listener() -> None:
    async def body() -> None:
        svc = await start("127.0.0.1", 0)
        owner = await connect(svc, "owner")
        sci = await connect(svc, "scientist")
        await expect(owner, "peer_joined")
        await svc.stop()
        assert (await expect(sci, "room_closed")).code == "shutdown"
        await expect_closed(sci)
        assert (await expect(owner, "room_closed")).code == "shutdown"
        await expect_closed(owner)
        assert svc.state.stats()["connections"] == 0
        with pytest.raises(SignalingError) as info:
            await connect(svc, "owner", timeout=2)
        assert "could not reach" in str(info.value)
        await svc.stop()  # idempotent

    run(body())


def test_limits_validation() -> None:
    with pytest.raises(ValueError):
        Limits(max_rooms=0)
    with pytest.raises(ValueError):
        Limits(peers_per_room=1)
    with pytest.raises(ValueError):
        Limits(room_ttl_seconds=-1)
    assert Limits(room_idle_seconds=0.3).sweep_interval() <= 0.3 / 4
    assert Limits(room_ttl_seconds=0.2).sweep_interval() <= 0.05
    assert Limits().sweep_interval() == 1.0


# ----------------------------------------------------- the real console script
class _Proc:
    """The service as a child process, with its stdout read on a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "duet_signaling", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)

    def url(self, timeout: float = 15.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.p.kill()
            raise AssertionError(f"no listening line; stderr: {self.p.communicate(timeout=5)[1]}")
        prefix = "duet-signaling listening on "
        assert line.startswith(prefix), line
        return line[len(prefix):].strip()

    def stop(self, sig: int) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout=10)
        finally:
            if self.p.poll() is None:  # pragma: no cover
                self.p.kill()
                self.p.wait(5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_console_script_subprocess(sig: int) -> None:
    proc = _Proc("--room-idle-seconds", "600", "--max-rooms", "5")
    try:
        url = proc.url()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok", "rooms": 0, "peers": 0}

        async def relay() -> None:
            owner = await SignalingClient.connect(url, ROOM, "owner", timeout=WAIT)
            sci = await SignalingClient.connect(url, ROOM, "scientist", timeout=WAIT)
            await expect(owner, "peer_joined")
            await sci.send("over the real service")
            assert (await expect(owner, "msg")).data == "over the real service"
            await owner.send("and back", to=sci.peer_id)
            assert (await expect(sci, "msg")).data == "and back"
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                assert json.loads(resp.read()) == {"status": "ok", "rooms": 1, "peers": 2}
            await sci.close()
            await owner.close()

        run(relay())
    finally:
        code = proc.stop(sig)
    assert code == 0
    stderr = proc.p.stderr.read() if proc.p.stderr else ""
    assert "over the real service" not in stderr and ROOM not in stderr
    assert "Traceback" not in stderr


def test_console_script_rejects_bad_limits_and_busy_port() -> None:
    from duet_signaling.__main__ import main

    with pytest.raises(SystemExit):
        main(["--max-rooms", "0"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["--host", "127.0.0.1", "--port", str(s.getsockname()[1])]) == 1
