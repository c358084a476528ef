"""Transport layer: framing (pure), the in-memory pair, and real WebRTC on 127.0.0.1.

Every WebRTC peer here uses IceConfig(local_only=True): candidates are
127.0.0.1 only and no STUN/TURN server is configured, so no packet leaves
loopback. Waits are on events and futures with timeouts, never sleeps.

Run as `python tests/test_transport.py --child` this file is the answering
peer of the two-process test (SDP over stdin/stdout).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from duet import runtime  # noqa: E402
from duet.errors import ConnectionLost, ProtocolError  # noqa: E402
from duet.transport import framing  # noqa: E402
from duet.transport.framing import MAX_FRAME, Deframer, Framer, frame_all  # noqa: E402
from duet.transport.memory import memory_pair  # noqa: E402
from duet.transport.ice import IceConfig  # noqa: E402
from duet.transport.sdp import candidate_addresses, keep_loopback_candidates  # noqa: E402
from duet.transport.webrtc import RtcPeer, WebRtcTransport  # noqa: E402

if __name__ != "__main__":
    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# helpers


class Collector:
    """on_message/on_close target that threads can wait on."""

    def __init__(self) -> None:
        self.messages: List[bytes] = []
        self.closed: List[Optional[BaseException]] = []
        self.cond = threading.Condition()

    def on_message(self, m: bytes) -> None:
        with self.cond:
            self.messages.append(m)
            self.cond.notify_all()

    def on_close(self, exc: Optional[BaseException]) -> None:
        with self.cond:
            self.closed.append(exc)
            self.cond.notify_all()

    def wait_messages(self, n: int, timeout: float = TIMEOUT) -> List[bytes]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise AssertionError(f"got {len(self.messages)} of {n} messages in {timeout} s")
            return list(self.messages)

    def wait_closed(self, timeout: float = TIMEOUT) -> Optional[BaseException]:
        with self.cond:
            if not self.cond.wait_for(lambda: bool(self.closed), timeout):
                raise AssertionError(f"on_close did not fire within {timeout} s")
            return self.closed[0]


def attach(t: Any) -> Collector:
    c = Collector()
    t.set_handlers(c.on_message, c.on_close)
    return c


async def _connect(opts_a: Optional[dict] = None, opts_b: Optional[dict] = None
                   ) -> Tuple[RtcPeer, RtcPeer, str, str]:
    a = await RtcPeer.create(IceConfig(local_only=True), **(opts_a or {}))
    b = await RtcPeer.create(IceConfig(local_only=True), **(opts_b or {}))
    offer = await a.create_offer()
    answer = await b.accept_offer(offer)
    await a.accept_answer(answer)
    await a.wait_open(TIMEOUT)
    await b.wait_open(TIMEOUT)
    return a, b, offer, answer


def connect(opts_a: Optional[dict] = None, opts_b: Optional[dict] = None
            ) -> Tuple[RtcPeer, RtcPeer, str, str]:
    return runtime.run(_connect(opts_a, opts_b), TIMEOUT, "WebRTC connect")


def close_all(*peers: RtcPeer) -> None:
    for p in peers:
        runtime.run(p.close(), TIMEOUT, "close")


# ---------------------------------------------------------------------------
# framing (pure)

if __name__ != "__main__":

    def roundtrip(messages: List[bytes], max_frame: int = MAX_FRAME) -> List[bytes]:
        frames = frame_all(messages, max_frame)
        assert all(len(f) <= max_frame for f in frames)
        d = Deframer()
        out: List[bytes] = []
        for f in frames:
            out.extend(bytes(m) for m in d.feed(f))
        assert d.in_progress is None
        return out

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        sizes=st.lists(st.integers(min_value=0, max_value=3000), max_size=40),
        max_frame=st.integers(min_value=64, max_value=1200),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_framing_roundtrip_small_frames(sizes: List[int], max_frame: int, seed: int) -> None:
        """Any sizes, including 0 and many times the frame size, come back intact."""
        rnd = random.Random(seed)
        messages = [rnd.randbytes(n) for n in sizes]
        assert roundtrip(messages, max_frame) == messages

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(sizes=st.lists(
        st.sampled_from([0, 1, 100, MAX_FRAME - 6, MAX_FRAME - 5, MAX_FRAME - 4, MAX_FRAME,
                         MAX_FRAME + 1, 3 * MAX_FRAME + 7, 700_001]),
        max_size=8))
    def test_framing_roundtrip_real_frame_size(sizes: List[int]) -> None:
        messages = [os.urandom(n) for n in sizes]
        assert roundtrip(messages) == messages

    def test_small_messages_are_coalesced() -> None:
        messages = [b"m%05d" % i for i in range(50_000)]
        frames = frame_all(messages)
        # 50k records of 11 bytes: a handful of full frames, not 50k sends
        assert len(frames) <= 3
        assert roundtrip(messages) == messages

    def test_framer_counters_and_controls() -> None:
        f = Framer(4096)
        f.add(b"a" * 10000)
        f.add(b"b")
        f.add_control(framing.CTRL_PING)
        assert f.pending_bytes == 10001 and f.pending_messages == 3
        controls: List[int] = []
        d = Deframer(on_control=controls.append)
        out = []
        while True:
            frame = f.next_frame()
            if frame is None:
                break
            out += d.feed(frame)
        assert [bytes(m) for m in out] == [b"a" * 10000, b"b"]
        assert controls == [framing.CTRL_PING]
        assert f.pending_bytes == 0 and f.messages_framed == 2 and not f

    def test_progress_reported_for_chunked_messages() -> None:
        seen: List[Tuple[int, int]] = []
        d = Deframer(on_progress=lambda r, t: seen.append((r, t)))
        msg = os.urandom(3 * MAX_FRAME)
        out = []
        for fr in frame_all([msg]):
            out += d.feed(fr)
        assert bytes(out[0]) == msg
        assert seen[-1] == (len(msg), len(msg))
        assert [r for r, _ in seen] == sorted(r for r, _ in seen) and len(seen) >= 3

    def test_big_message_delivered_without_final_copy() -> None:
        msg = os.urandom(2 * MAX_FRAME)
        d = Deframer()
        out = []
        for fr in frame_all([msg]):
            out += d.feed(fr)
        assert isinstance(out[0], bytearray) and out[0] == msg

    def _hdr(kind: int, n: int) -> bytes:
        return struct.pack(">BI", kind, n)

    def _first(n: int, total: int) -> bytes:
        return struct.pack(">BIQ", framing.FIRST, n, total)

    @pytest.mark.parametrize("frame", [
        b"",                                                   # empty frame
        b"\x01\x00\x00",                                       # truncated header
        _hdr(framing.WHOLE, 10) + b"abc",                      # length overruns frame
        _hdr(99, 0),                                           # unknown record type
        _hdr(framing.MIDDLE, 1) + b"x",                        # chunk without a first
        _hdr(framing.LAST, 1) + b"x",                          # last without a first
        _first(2, 1) + b"xx",                                  # first larger than total
        _first(1, 1 << 40) + b"x",                             # absurd total: refused
        _first(1, 10) + b"x" + _hdr(framing.WHOLE, 0),         # whole inside chunked
        _first(1, 10) + b"x" + _first(1, 10) + b"x",           # nested first
        _first(1, 3) + b"x" + _hdr(framing.MIDDLE, 5) + b"yyyyy",  # exceeds total
        _first(1, 3) + b"x" + _hdr(framing.LAST, 1) + b"y",    # last ends early
        _hdr(framing.CONTROL, 2) + b"\x01\x01",                # control of wrong length
        _first(1, 3)[:9],                                      # truncated first header
    ])
    def test_corrupt_frames_raise_protocol_error(frame: bytes) -> None:
        d = Deframer()
        with pytest.raises(ProtocolError):
            d.feed(frame)
        with pytest.raises(ProtocolError):  # the stream stays failed
            d.feed(_hdr(framing.WHOLE, 0))

    def test_max_message_size_limit() -> None:
        d = Deframer(max_message_size=1000)
        frames = frame_all([bytes(5000)], max_frame=1024)
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            d.feed(frames[0])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_hostile_bytes_only_raise_protocol_error(data: bytes) -> None:
        d = Deframer(max_message_size=1 << 20)
        try:
            d.feed(data)
        except ProtocolError:
            pass

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 3000), min_size=1, max_size=10),
           st.integers(0, 2**32 - 1), st.integers(0, 255))
    def test_mutated_frames_only_raise_protocol_error(sizes: List[int], pos: int, byte: int) -> None:
        frames = frame_all([bytes(n) for n in sizes], max_frame=1024)
        i = pos % len(frames)
        f = bytearray(frames[i])
        f[(pos // 7) % len(f)] = byte
        frames[i] = bytes(f)
        d = Deframer(max_message_size=1 << 20)
        try:
            for fr in frames:
                d.feed(fr)
        except ProtocolError:
            pass


# ---------------------------------------------------------------------------
# memory pair

if __name__ != "__main__":

    def test_memory_pair_ordered_both_ways() -> None:
        a, b = memory_pair()
        ca, cb = attach(a), attach(b)
        for i in range(1000):
            a.send(b"%d" % i)
            b.send(b"r%d" % i)
        assert cb.wait_messages(1000) == [b"%d" % i for i in range(1000)]
        assert ca.wait_messages(1000) == [b"r%d" % i for i in range(1000)]
        runtime.run(a.close(), TIMEOUT)

    def test_memory_pair_threads_keep_per_thread_order() -> None:
        a, b = memory_pair()
        cb = attach(b)
        n, threads = 2000, 4

        def worker(k: int) -> None:
            for i in range(n):
                a.send(b"%d:%d" % (k, i))

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(TIMEOUT)
        got = cb.wait_messages(n * threads)
        for k in range(threads):
            mine = [m for m in got if m.startswith(b"%d:" % k)]
            assert mine == [b"%d:%d" % (k, i) for i in range(n)]
        runtime.run(a.drain(), TIMEOUT)

    def test_memory_pair_queues_before_handlers_and_close_propagates() -> None:
        a, b = memory_pair()
        ca = attach(a)
        for i in range(10):
            a.send(b"%d" % i)
        runtime.run(a.drain(), TIMEOUT)
        runtime.run(a.close(), TIMEOUT)
        assert a.closed and b.closed
        cb = attach(b)  # late: the backlog and then the close arrive, in that order
        assert cb.wait_messages(10) == [b"%d" % i for i in range(10)]
        assert cb.wait_closed() is None
        assert ca.wait_closed() is None
        with pytest.raises(ConnectionLost):
            b.send(b"x")
        with pytest.raises(ConnectionLost):
            a.send(b"x")
        runtime.run(a.close(), TIMEOUT)  # idempotent


# ---------------------------------------------------------------------------
# WebRTC, two peers in this process

if __name__ != "__main__":

    def test_webrtc_candidates_are_loopback_and_fingerprints_cross() -> None:
        a, b, offer, answer = connect()
        try:
            for sdp in (offer, answer, a.pc.localDescription.sdp, b.pc.localDescription.sdp):
                addrs = candidate_addresses(sdp)
                assert addrs and all(x == "127.0.0.1" for x in addrs), addrs
            for pc in (a.pc, b.pc):
                remote = pc.remoteDescription.sdp
                assert all(x == "127.0.0.1" for x in candidate_addresses(remote))
            assert a.local_fingerprint == b.remote_fingerprint
            assert b.local_fingerprint == a.remote_fingerprint
            assert a.local_fingerprint != b.local_fingerprint
            assert len(a.local_fingerprint.split(":")) == 32
        finally:
            close_all(a, b)

    def test_keep_loopback_candidates_filters_and_fails_clearly() -> None:
        sdp = ("v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
               "a=candidate:1 1 udp 2130706431 192.0.2.7 5000 typ host\r\n"
               "a=candidate:2 1 udp 2130706431 127.0.0.1 5001 typ host\r\n"
               "a=candidate:3 1 udp 2130706431 abc.local 5002 typ host\r\n")
        kept = keep_loopback_candidates(sdp)
        assert candidate_addresses(kept) == ["127.0.0.1"]
        with pytest.raises(ConnectionLost, match="127.0.0.1"):
            keep_loopback_candidates(sdp.replace("127.0.0.1", "192.0.2.8"))

    def test_webrtc_ordered_small_and_big_messages_both_ways() -> None:
        a, b, _, _ = connect()
        try:
            ta, tb = a.transport, b.transport
            assert isinstance(ta, WebRtcTransport) and isinstance(tb, WebRtcTransport)
            ca, cb = attach(ta), attach(tb)
            progress: List[Tuple[int, int]] = []
            tb.on_progress = lambda r, t: progress.append((r, t))
            big = [os.urandom(8 << 20), os.urandom(3 * MAX_FRAME + 5)]
            expected: List[bytes] = []
            for i in range(3000):
                m = b"small %d " % i + os.urandom(i % 300)
                expected.append(m)
                ta.send(m)
                if i in (1000, 2000):
                    ta.send(big[i // 1000 - 1])
                    expected.append(big[i // 1000 - 1])
            replies = [b"reply %d" % i for i in range(500)]
            for r in replies:
                tb.send(r)
            got = cb.wait_messages(len(expected), 60)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert hashlib.sha256(g).digest() == hashlib.sha256(e).digest()
            assert ca.wait_messages(len(replies)) == replies
            assert progress and progress[-1][0] == progress[-1][1]
            assert (len(big[0]), len(big[0])) in progress
            runtime.run(ta.drain(), TIMEOUT)
            stats = ta.stats()
            assert stats["frames_sent"] < 400  # coalesced: not one frame per message
        finally:
            close_all(a, b)

    def test_webrtc_close_propagates() -> None:
        a, b, _, _ = connect()
        ta, tb = a.transport, b.transport
        assert ta is not None and tb is not None
        ca, cb = attach(ta), attach(tb)
        ta.send(b"last words")
        runtime.run(ta.close(), TIMEOUT, "close")
        assert cb.wait_messages(1) == [b"last words"]  # sent before close: delivered
        assert cb.wait_closed() is None  # orderly close: on_close(None)
        assert ca.wait_closed() is None
        assert ta.closed and tb.closed
        with pytest.raises(ConnectionLost):
            ta.send(b"x")
        with pytest.raises(ConnectionLost):
            tb.send(b"x")
        close_all(a, b)  # idempotent

    def test_webrtc_pending_drain_fails_when_peer_vanishes() -> None:
        a, b, _, _ = connect()
        ta, tb = a.transport, b.transport
        assert ta is not None and tb is not None
        ca = attach(ta)
        attach(tb)
        ta.send(bytes(32 << 20))  # more than the link carries before the abort

        async def abort_b_then_drain() -> None:
            await b.pc.close()  # no goodbye: an abrupt end, like a crash
            await ta.drain()

        with pytest.raises(ConnectionLost):
            runtime.run(abort_b_then_drain(), TIMEOUT)
        assert isinstance(ca.wait_closed(), ConnectionLost)
        close_all(a, b)

    def test_webrtc_dead_peer_detected_by_keepalive_timeout() -> None:
        # b sends no keepalives and nothing else: a must give up after ~1 s.
        a, b, _, _ = connect({"dead_peer_timeout": 1.0, "keepalive_interval": 0.2},
                             {"keepalive_interval": 0, "dead_peer_timeout": None})
        try:
            ta = a.transport
            assert ta is not None
            ca = attach(ta)
            t0 = time.monotonic()
            exc = ca.wait_closed(10)
            assert isinstance(exc, ConnectionLost) and "no data from the peer" in str(exc)
            assert 0.8 <= time.monotonic() - t0 < 5
        finally:
            close_all(a, b)

    def test_webrtc_wait_open_times_out_clearly() -> None:
        async def unanswered() -> BaseException:
            a = await RtcPeer.create(IceConfig(local_only=True))
            try:
                await a.create_offer()
                await a.wait_open(0.3)
            except TimeoutError as exc:
                # returned, not raised: runtime.run reports any TimeoutError
                # as its own timeout (concurrent.futures.TimeoutError is
                # TimeoutError on Python >= 3.11)
                return exc
            finally:
                await a.close()
            raise AssertionError("wait_open returned without an answer")

        t0 = time.monotonic()
        exc = runtime.run(unanswered(), TIMEOUT)
        assert "did not open within 0.3 s" in str(exc)
        assert time.monotonic() - t0 < 5

    def test_local_only_refuses_servers() -> None:
        with pytest.raises(ValueError):
            runtime.run(RtcPeer.create(IceConfig(servers=["stun:127.0.0.1:3478"],
                                                 local_only=True)), TIMEOUT)


# ---------------------------------------------------------------------------
# WebRTC between two processes


def _child() -> None:
    """Answerer: read the offer, answer, receive one message, reply with its sha256."""
    runtime.loop()
    print(json.dumps({"hello": True}), flush=True)
    offer = json.loads(sys.stdin.readline())["offer"]

    async def answer() -> Tuple[RtcPeer, str]:
        peer = await RtcPeer.create(IceConfig(local_only=True))
        return peer, await peer.accept_offer(offer)

    peer, sdp = runtime.run(answer(), 30, "answer")
    print(json.dumps({"answer": sdp}), flush=True)
    tr = runtime.run(peer.wait_open(30), 35, "open")
    c = attach(tr)
    msg = c.wait_messages(1, 60)[0]
    tr.send(hashlib.sha256(msg).hexdigest().encode())
    exc = c.wait_closed(60)
    sys.exit(0 if exc is None else 3)


if __name__ != "__main__":

    def _readline(stream: Any, timeout: float) -> str:
        box: List[str] = []
        t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise AssertionError(f"the child did not answer within {timeout} s")
        return box[0]

    @pytest.mark.slow
    @pytest.mark.timeout(90)
    def test_webrtc_two_processes_16mb_sha256() -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
        peer: Optional[RtcPeer] = None
        try:
            json.loads(_readline(proc.stdout, 60))  # imports done

            async def offer() -> Tuple[RtcPeer, str]:
                p = await RtcPeer.create(IceConfig(local_only=True))
                return p, await p.create_offer()

            peer, sdp = runtime.run(offer(), TIMEOUT, "offer")
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"offer": sdp}) + "\n")
            proc.stdin.flush()
            answer = json.loads(_readline(proc.stdout, 30))["answer"]
            assert all(x == "127.0.0.1" for x in candidate_addresses(answer))
            runtime.run(peer.accept_answer(answer), TIMEOUT)
            tr = runtime.run(peer.wait_open(TIMEOUT), TIMEOUT + 5, "open")
            c = attach(tr)
            payload = os.urandom(16 << 20)
            tr.send(payload)
            reply = c.wait_messages(1, 60)[0]
            assert reply.decode() == hashlib.sha256(payload).hexdigest()
            runtime.run(peer.close(), TIMEOUT, "close")
            peer = None
            assert proc.wait(20) == 0  # the child saw an orderly close
        finally:
            if peer is not None:
                runtime.run(peer.close(), TIMEOUT, "close")
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
