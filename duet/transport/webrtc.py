"""The real link: one aiortc data channel between the owner and the scientist.

What this adds on top of a bare `RTCDataChannel`, and why:

- Coalescing and chunking (`framing`): one aiortc `send()` per small message
  tops out near 2,300 msg/s, and aiortc refuses messages above 256 KiB.
- A writer task with backpressure on `bufferedAmount`, so a 500 MB tensor does
  not sit in aiortc's queues at once and `send()` can stay non-blocking and
  thread safe (aiortc's own `send` must only be called on the loop thread).
- Bigger UDP socket buffers: aioice asks for 256 KiB; a dropped datagram costs
  an SCTP retransmission timeout (at least 1 s) and collapses the window.
- SCTP tuning: a capped congestion window and delayed SACKs, which cut
  aiortc's CPU work per byte sent.
- A keepalive record and a dead-peer timeout: aiortc notices a vanished peer
  only through ICE consent freshness (about 30 s, measured); we want ~10 s.
- An orderly close (a goodbye record) so the peer's `on_close` gets `None`
  for a deliberate close and `ConnectionLost` for a failure.
- A loopback-only ICE mode: aioice never offers 127.0.0.1 as a candidate, yet
  tests must keep every packet on loopback, and two peers on one machine have
  no need for any other interface.

This module holds the transport (`WebRtcTransport`) and the peer connection
that negotiates it (`RtcPeer`). The pieces that reach into aioice and aiortc
internals (loopback gathering, SCTP tuning, socket buffers) are in
`duet.transport.patches`; reading SDP text is in `duet.transport.sdp`; ICE
servers and the no-route diagnosis are in `duet.transport.ice`.

Everything here runs on the runtime loop (`duet.runtime`); only
`WebRtcTransport.send` may be called from other threads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any, Deque, List, Optional, Union

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from ..errors import ConnectionFailed, ConnectionLost, ProtocolError
from .base import CloseHandler, MessageHandler, Transport
from .framing import CTRL_BYE, CTRL_PING, DEFAULT_MAX_MESSAGE, MAX_FRAME, Deframer, Framer
from .ice import ICE_CHECK_TIMEOUT, IceConfig, IceServerUrl, no_route_message, relay_gathered, rtc_configuration, srflx_gathered
from .patches import (
    CWND_MAX,
    SACK_EVERY,
    SOCKET_BUFFER,
    enlarge_socket_buffers,
    install_loopback_patch,
    set_local_description,
    t3_expirations,
    tune_sctp,
)
from .sdp import fingerprint_of, keep_loopback_candidates

log = logging.getLogger(__name__)

CHANNEL_LABEL = "duet"
CHANNEL_ID = 0  # negotiated out of band: both sides create it, no open handshake

# Writer backpressure on aiortc's bufferedAmount (bytes SCTP has not taken
# yet). SCTP takes one data channel message at a time (when its previous one
# is fully transmitted), so a few frames queued keep it busy; more only costs
# memory. Measured here: 256 KiB, 1 MiB and 4 MiB high watermarks give the
# same throughput within this shared machine's noise; CPU per byte is lowest
# at 1 MiB (benchmarks/transport_throughput.py --high-water/--low-water).
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
KEEPALIVE_INTERVAL = 1.0
DEAD_PEER_TIMEOUT = 10.0
CLOSE_LINGER = 3.0


# --------------------------------------------------------------------------
# The transport


class WebRtcTransport(Transport):
    """A Transport over one aiortc data channel. Create it through `RtcPeer`."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        channel: RTCDataChannel,
        *,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        dead_peer_timeout: Optional[float] = DEAD_PEER_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._pc = pc
        self._channel = channel
        self._high = high_water
        self._low = min(low_water, high_water)
        self._keepalive_interval = keepalive_interval
        self._dead_peer_timeout = dead_peer_timeout

        # Sending: any thread appends here; the writer task frames and sends.
        self._outq: Deque[bytes] = collections.deque()
        self._wake_pending = False
        self._wake = asyncio.Event()
        self._low_event = asyncio.Event()
        self._framer = Framer(MAX_FRAME)
        self._drain_waiters: List[tuple[int, asyncio.Future]] = []
        self._writer_task: Optional[asyncio.Task] = None
        self._monitor_task: Optional[asyncio.Task] = None
        self._last_sent = 0.0
        self._silence = 0.0
        self._frames_sent = 0
        self._frames_received = 0

        # Receiving.
        self._deframer = Deframer(
            max_message_size=max_message_size,
            on_progress=self.report_progress,
            on_control=self._control,
        )
        self._inbox: List[Union[bytes, bytearray]] = []
        self._bye_received = False

        # State.
        self._opened: asyncio.Future = self._loop.create_future()
        self._closing = False
        self._closed = False
        self._close_reason: Optional[BaseException] = None
        self._close_fired = False
        self._peer_gone = asyncio.Event()
        self._pc_close_task: Optional[asyncio.Task] = None
        self._close_task: Optional[asyncio.Task] = None

        channel.bufferedAmountLowThreshold = self._low
        channel.on("message", self._on_frame)
        channel.on("open", self._on_open)
        channel.on("close", self._on_channel_close)
        channel.on("bufferedamountlow", self._low_event.set)
        pc.on("connectionstatechange", self._on_pc_state)
        if channel.readyState == "open":
            self._on_open()

    # -- public API ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue one message. Thread safe, non-blocking. ConnectionLost once closed."""
        if self._closing or self._closed:
            raise ConnectionLost(self._closed_message())
        if not isinstance(data, (bytes, bytearray)):
            if not isinstance(data, memoryview):
                raise TypeError(f"send() takes bytes, not {type(data).__name__}")
            if not data.contiguous:
                raise ValueError("send() needs a contiguous buffer")
            data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        self._outq.append(data)
        if not self._wake_pending:
            self._wake_pending = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._wakeup)
            else:
                self._loop.call_soon_threadsafe(self._wakeup)

    async def drain(self) -> None:
        """Wait until every message queued so far was handed to the data channel.

        Raises ConnectionLost if the link closes first.
        """
        target = self._framer.messages_added + len(self._outq)
        if self._framer.messages_framed >= target:
            if self._closed and self._close_reason is not None:
                raise ConnectionLost(self._closed_message())
            return
        if self._closed:
            raise ConnectionLost(self._closed_message())
        fut = self._loop.create_future()
        self._drain_waiters.append((target, fut))
        await fut

    async def close(self, linger: float = CLOSE_LINGER) -> None:
        """Close both directions; the peer's on_close(None) fires. Idempotent.

        Messages queued before close are still sent, and the peer acknowledges
        the goodbye by closing its side; after `linger` seconds we close anyway.
        Our own on_close fires too, with None.
        """
        if self._close_task is None:
            self._close_task = self._loop.create_task(self._close(linger))
        await asyncio.shield(self._close_task)

    async def _close(self, linger: float) -> None:
        if not self._closed:
            self._closing = True
            if self._opened.done() and self._channel.readyState == "open":
                self._framer.add_control(CTRL_BYE)
                self._wakeup()
                try:
                    await asyncio.wait_for(self._peer_gone.wait(), linger)
                except asyncio.TimeoutError:
                    log.info("the peer did not acknowledge close within %s s", linger)
            self._shutdown(None)
        if self._pc_close_task is not None:
            await asyncio.shield(self._pc_close_task)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> Optional[BaseException]:
        """None after an orderly close; the error after a failure."""
        return self._close_reason

    @property
    def peer_connection(self) -> RTCPeerConnection:
        return self._pc

    @property
    def route(self) -> Any:
        """The path this link took (duet.transport.route.Route), or None before ICE nominated one."""
        from .route import selected_route

        return selected_route(self._pc)

    @property
    def max_frame(self) -> int:
        return self._framer.max_frame

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler) -> None:
        """Attach the receiver; earlier messages (and an earlier close) are delivered on the loop."""
        super().set_handlers(on_message, on_close)
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self._deliver_backlog)
        else:
            self._loop.call_soon_threadsafe(self._deliver_backlog)

    def stats(self) -> dict:
        """Counters for diagnostics and benchmarks."""
        sctp = self._pc.sctp
        return {
            "sctp_t3_expired": t3_expirations(sctp),
            "sctp_cwnd": getattr(sctp, "_cwnd", None),
            "frames_sent": self._frames_sent,
            "frames_received": self._frames_received,
            "messages_framed": self._framer.messages_framed,
            "pending_bytes": self._framer.pending_bytes + sum(len(m) for m in list(self._outq)),
            "buffered_amount": self._channel.bufferedAmount,
        }

    # -- opening -------------------------------------------------------------

    def _on_open(self) -> None:
        if self._opened.done():
            return
        sctp = self._pc.sctp
        remote_max = getattr(sctp, "_remote_max_message_size", MAX_FRAME) if sctp else MAX_FRAME
        # 0 means "no limit" in SDP's max-message-size.
        self._framer.max_frame = min(MAX_FRAME, remote_max) if remote_max else MAX_FRAME
        self._opened.set_result(None)
        self._last_sent = self._loop.time()
        self._writer_task = self._loop.create_task(self._writer())
        if self._keepalive_interval > 0:
            self._monitor_task = self._loop.create_task(self._monitor())

    async def wait_open(self, timeout: float) -> None:
        """Wait for the channel to open; ConnectionLost or TimeoutError otherwise."""
        done, _ = await asyncio.wait({self._opened}, timeout=timeout)
        if not done:
            raise TimeoutError(
                f"the WebRTC data channel did not open within {timeout} s "
                f"(ICE {self._pc.iceConnectionState}, connection {self._pc.connectionState})")
        self._opened.result()

    # -- writing -------------------------------------------------------------

    def _wakeup(self) -> None:
        # Clear first: a send() that appends after this sees False and wakes us again.
        self._wake_pending = False
        self._wake.set()

    async def _writer(self) -> None:
        framer = self._framer
        outq = self._outq
        ch = self._channel
        try:
            while True:
                while outq:
                    framer.add(outq.popleft())
                if not framer:
                    self._wake.clear()
                    if outq:
                        continue
                    await self._wake.wait()
                    continue
                if ch.bufferedAmount > self._high:
                    self._low_event.clear()
                    # bufferedamountlow fires when aiortc hands data to SCTP and
                    # crosses the threshold; the timeout is only a safety net.
                    try:
                        await asyncio.wait_for(self._low_event.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                    continue
                frame = framer.next_frame()
                if frame is None:
                    continue
                if ch.readyState != "open":
                    raise ConnectionLost("the data channel closed")
                ch.send(frame)
                self._frames_sent += 1
                self._last_sent = self._loop.time()
                if self._drain_waiters:
                    self._release_drain_waiters()
        except asyncio.CancelledError:
            raise
        except ConnectionLost as exc:
            self._shutdown(exc)
        except Exception as exc:  # aiortc refused a frame: the link is unusable
            log.exception("WebRTC writer failed")
            self._shutdown(ConnectionLost(f"sending on the data channel failed: {exc!r}"))

    def _release_drain_waiters(self) -> None:
        handed = self._framer.messages_framed
        keep = []
        for target, fut in self._drain_waiters:
            if handed >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._drain_waiters = keep

    async def _monitor(self) -> None:
        """Send keepalives when idle; declare the peer dead after a silence.

        Silence is accumulated per tick and each tick counts at most twice
        the interval, so a loop that was blocked (a long callback, a paused
        process) does not mistake its own stall for the peer's death.
        """
        interval = self._keepalive_interval
        timeout = self._dead_peer_timeout
        last_tick = self._loop.time()
        while not self._closed:
            await asyncio.sleep(interval)
            now = self._loop.time()
            self._silence += min(now - last_tick, 2 * interval)
            last_tick = now
            if timeout is not None and self._silence >= timeout:
                self._shutdown(ConnectionLost(
                    f"no data from the peer for {timeout:g} s: it has gone away "
                    f"or the network between us failed"))
                return
            if not self._closing and not self._framer and not self._outq \
                    and now - self._last_sent >= interval * 0.9:
                self._framer.add_control(CTRL_PING)
                self._wakeup()

    # -- reading -------------------------------------------------------------

    def _on_frame(self, frame: Union[bytes, str]) -> None:
        self._silence = 0.0
        if self._closed:
            return
        self._frames_received += 1
        if isinstance(frame, str):
            self._shutdown(ProtocolError("text message on the Duet data channel"))
            return
        try:
            messages = self._deframer.feed(frame)
        except ProtocolError as exc:
            log.warning("closing the link: %s", exc)
            self._shutdown(exc)
            return
        if messages:
            self._deliver(messages)
        if self._bye_received:
            # The peer said goodbye after its last message: close our side.
            self._shutdown(None)

    def _control(self, code: int) -> None:
        if code == CTRL_BYE:
            self._bye_received = True
        # CTRL_PING: arrival alone resets the silence counter; unknown codes
        # are ignored so later versions can add some.

    def _deliver(self, messages: List[Union[bytes, bytearray]]) -> None:
        handler = self._on_message
        if handler is None or self._inbox:
            self._inbox.extend(messages)
            if handler is None:
                return
            messages, self._inbox = self._inbox, []
        for msg in messages:
            try:
                handler(msg)
            except Exception:  # a buggy handler must not break the link
                log.exception("on_message handler raised")

    def _deliver_backlog(self) -> None:
        if self._inbox and self._on_message is not None:
            self._deliver([])
        if self._closed:
            self._fire_close()

    # -- closing -------------------------------------------------------------

    def _closed_message(self) -> str:
        if self._close_reason is not None:
            return f"the WebRTC link is closed: {self._close_reason}"
        return "the WebRTC link is closed"

    def _on_channel_close(self) -> None:
        self._peer_gone.set()
        self._shutdown(None if self._bye_received or self._closing else ConnectionLost(
            "the data channel closed without a goodbye from the peer "
            "(the peer went away, or ICE consent expired)"))

    def _on_pc_state(self) -> None:
        state = self._pc.connectionState
        if state not in ("failed", "closed"):
            return
        self._peer_gone.set()
        reason: Optional[BaseException]
        if not self._opened.done():
            reason = ConnectionLost(
                f"the WebRTC connection {state} before the data channel opened "
                f"(ICE {self._pc.iceConnectionState}); is the peer reachable?")
        elif self._bye_received or self._closing:
            reason = None
        elif state == "failed":
            reason = ConnectionLost(
                "the WebRTC connection failed (ICE consent expired or DTLS error)")
        else:
            reason = ConnectionLost("the WebRTC connection closed")
        self._shutdown(reason)

    def _shutdown(self, reason: Optional[BaseException]) -> None:
        """Loop thread. Idempotent: mark closed, fail waiters, close the peer connection."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._close_reason = reason
        self._peer_gone.set()
        if not self._opened.done():
            self._opened.set_exception(
                reason or ConnectionLost("the link was closed before the data channel opened"))
            self._opened.exception()  # mark retrieved: nobody may be waiting
        err = ConnectionLost(self._closed_message())
        for target, fut in self._drain_waiters:
            if not fut.done():
                if self._framer.messages_framed >= target:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
        self._drain_waiters = []
        self._outq.clear()
        self._low_event.set()
        current = asyncio.current_task(self._loop) if self._loop.is_running() else None
        for task in (self._writer_task, self._monitor_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
        if self._pc_close_task is None:
            self._pc_close_task = self._loop.create_task(self._close_pc())
        self._loop.call_soon(self._fire_close)

    async def _close_pc(self) -> None:
        try:
            if self._channel.readyState not in ("closing", "closed"):
                self._channel.close()
            await self._pc.close()
        except Exception:
            log.debug("closing the peer connection raised", exc_info=True)

    def _fire_close(self) -> None:
        if self._close_fired or self._on_close is None or self._inbox:
            return
        self._close_fired = True
        try:
            self._on_close(self._close_reason)
        except Exception:
            log.exception("on_close handler raised")


# --------------------------------------------------------------------------
# The peer connection


class RtcPeer:
    """One RTCPeerConnection with one negotiated data channel ("duet"), ordered, reliable.

    Signaling is the caller's business: move the offer and answer SDP
    strings between the peers (sealed, through the pairing layer). There is no
    trickle ICE: each description carries all candidates.

    aioice takes one STUN and one TURN server; when the TURN server tried gives no relay
    candidate (UDP blocked, say), the description is gathered again with the next TURN URL
    (`ice.server_choices`). When ICE checks find no route, `wait_open` raises ConnectionFailed
    after `ICE_CHECK_TIMEOUT`, saying what each side gathered.
    """

    def __init__(self, ice: IceConfig, pc: RTCPeerConnection, transport_options: dict,
                 socket_buffer: Optional[int] = SOCKET_BUFFER,
                 cwnd_max: Optional[int] = CWND_MAX, sack_every: int = SACK_EVERY,
                 ice_check_timeout: float = ICE_CHECK_TIMEOUT) -> None:
        self.ice = ice
        self._socket_buffer = socket_buffer
        self._cwnd_max = cwnd_max
        self._sack_every = sack_every
        self._options = transport_options
        self._ice_check_timeout = ice_check_timeout
        self._choices = ice.choices()
        self._choice = 0
        self._transport: Optional[WebRtcTransport] = None
        self._local_sdp: Optional[str] = None
        self._remote_sdp: Optional[str] = None
        self._checks_started: Optional[float] = None
        self._ice_connected = False
        self.socket_buffers: List[int] = []
        self.pc = pc
        self._watch(pc)

    @classmethod
    async def create(cls, ice: Optional[IceConfig] = None, *,
                     socket_buffer: Optional[int] = SOCKET_BUFFER,
                     cwnd_max: Optional[int] = CWND_MAX,
                     sack_every: int = SACK_EVERY,
                     ice_check_timeout: float = ICE_CHECK_TIMEOUT,
                     **transport_options: Any) -> "RtcPeer":
        """A new peer on the running loop.

        socket_buffer: UDP buffer size to ask for (None: leave aioice's 256 KiB).
        cwnd_max, sack_every: SCTP tuning (see `tune_sctp`); None and 1 turn it off.
        ice_check_timeout: seconds of ICE checks without a route before ConnectionFailed.
        transport_options: keyword arguments of WebRtcTransport (high_water,
        low_water, keepalive_interval, dead_peer_timeout, max_message_size).
        """
        ice = ice or IceConfig()
        if ice.local_only and ice.servers:
            raise ValueError("IceConfig(local_only=True) cannot use STUN/TURN servers")
        if ice.local_only:
            install_loopback_patch()
        pc = RTCPeerConnection(configuration=ice.rtc_configuration())
        return cls(ice, pc, transport_options, socket_buffer, cwnd_max, sack_every, ice_check_timeout)

    def _watch(self, pc: RTCPeerConnection) -> None:
        def on_ice_state() -> None:
            if pc is self.pc and pc.iceConnectionState in ("connected", "completed"):
                self._ice_connected = True

        pc.on("iceconnectionstatechange", on_ice_state)

    @property
    def servers(self) -> List[IceServerUrl]:
        """The STUN/TURN URLs this peer gathered with (one of each at most)."""
        return self._choices[self._choice] if self._choices else []

    def _make_channel(self) -> WebRtcTransport:
        if self._transport is not None:
            raise RuntimeError("this RtcPeer already negotiated its data channel")
        channel = self.pc.createDataChannel(
            CHANNEL_LABEL, ordered=True, negotiated=True, id=CHANNEL_ID)
        if self._cwnd_max or self._sack_every > 1:
            tune_sctp(self.pc, self._cwnd_max, self._sack_every)
        # The transport attaches its handlers now, before anything can arrive.
        self._transport = WebRtcTransport(self.pc, channel, **self._options)
        return self._transport

    async def _set_local(self, desc: RTCSessionDescription) -> str:
        await set_local_description(self.pc, desc, self.ice.local_only)
        if self._socket_buffer:
            self.socket_buffers = enlarge_socket_buffers(self.pc, self._socket_buffer)
        sdp = self.pc.localDescription.sdp
        self._local_sdp = sdp
        return sdp

    async def _try_next_servers(self, sdp: str) -> bool:
        """After gathering: if the TURN server gave no relay and another TURN URL is left, start over with it."""
        tried = self.servers
        if not any(u.is_turn for u in tried) or relay_gathered(sdp) or self._choice + 1 >= len(self._choices):
            return False
        if not srflx_gathered(sdp):
            # The STUN server did not answer either (UDP blocked): asking it again costs another 5 s.
            self._choices = self._choices[:self._choice + 1] + self.ice.choices(with_stun=False)[self._choice + 1:]
        self._choice += 1
        log.info("TURN %s gave no relay candidate; gathering again with %s",
                 ", ".join(u.url for u in tried if u.is_turn), ", ".join(u.url for u in self.servers) or "no servers")
        old = self.pc
        self._transport = None
        self.pc = RTCPeerConnection(configuration=rtc_configuration(self.servers))
        self._watch(self.pc)
        await old.close()
        return True

    def _remote(self, sdp: str, kind: str) -> RTCSessionDescription:
        if not isinstance(sdp, str) or not sdp.startswith("v=0"):
            raise ProtocolError(f"the remote {kind} is not an SDP description")
        if self.ice.local_only:
            sdp = keep_loopback_candidates(sdp)
        fingerprint_of(sdp)  # fail early and clearly if there is none
        self._remote_sdp = sdp
        return RTCSessionDescription(sdp=sdp, type=kind)

    async def create_offer(self) -> str:
        """Offerer: create the channel, gather candidates (no trickle), return the offer SDP."""
        while True:
            self._make_channel()
            offer = await self.pc.createOffer()
            sdp = await self._set_local(offer)
            if not await self._try_next_servers(sdp):
                return sdp

    async def accept_offer(self, sdp: str) -> str:
        """Answerer: apply the offer, gather candidates, return the answer SDP; ICE checks start."""
        while True:
            self._make_channel()
            await self.pc.setRemoteDescription(self._remote(sdp, "offer"))
            answer = await self.pc.createAnswer()
            local = await self._set_local(answer)
            if not await self._try_next_servers(local):
                self._checks_started = asyncio.get_running_loop().time()
                return local

    async def accept_answer(self, sdp: str) -> None:
        """Offerer: apply the answer; ICE and DTLS start connecting."""
        if self._transport is None:
            raise RuntimeError("accept_answer() before create_offer()")
        await self.pc.setRemoteDescription(self._remote(sdp, "answer"))
        self._checks_started = asyncio.get_running_loop().time()

    def no_route_message(self, peer: str) -> str:
        """What ICE tried and what to configure, for a link that found no route."""
        return no_route_message(self._local_sdp, self._remote_sdp, self.servers, peer, self._ice_check_timeout)

    async def wait_open(self, timeout: float, peer: str = "the peer") -> WebRtcTransport:
        """The transport, once the data channel is open. Never waits longer than `timeout`.

        ConnectionFailed (naming `peer` and what each side gathered) when ICE has found no route
        `ice_check_timeout` seconds after the checks started; TimeoutError if `timeout` comes first.
        """
        transport = self._transport
        if transport is None:
            raise RuntimeError("wait_open() before create_offer()/accept_offer()")
        loop = asyncio.get_running_loop()
        started = self._checks_started if self._checks_started is not None else loop.time()
        ice_left = max(0.0, started + self._ice_check_timeout - loop.time())
        first = min(timeout, ice_left)
        try:
            await transport.wait_open(first)
            return transport
        except TimeoutError:
            if self._ice_connected:  # a route exists; DTLS/SCTP are still coming up
                await transport.wait_open(max(0.0, timeout - first))
                return transport
            if first < ice_left:
                raise
            raise ConnectionFailed(self.no_route_message(peer)) from None
        except ConnectionLost:
            if self._ice_connected:
                raise
            raise ConnectionFailed(self.no_route_message(peer)) from None

    @property
    def transport(self) -> Optional[WebRtcTransport]:
        return self._transport

    @property
    def local_fingerprint(self) -> str:
        """sha-256 fingerprint of our DTLS certificate, as announced in our SDP."""
        if self._local_sdp is None:
            raise RuntimeError("no local description yet")
        return fingerprint_of(self._local_sdp)

    @property
    def remote_fingerprint(self) -> str:
        """sha-256 fingerprint the peer announced; DTLS verifies the peer against it."""
        if self._remote_sdp is None:
            raise RuntimeError("no remote description yet")
        return fingerprint_of(self._remote_sdp)

    @property
    def local_sdp(self) -> Optional[str]:
        return self._local_sdp

    async def close(self) -> None:
        """Close the transport (orderly goodbye if open) and the peer connection."""
        if self._transport is not None:
            await self._transport.close()
        await self.pc.close()
