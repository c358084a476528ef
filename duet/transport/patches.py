"""What Duet changes in aioice and aiortc, through their private names.

Three adjustments, each for a measured reason (see `duet.transport.webrtc`):

- Loopback-only gathering: aioice never offers 127.0.0.1 as a candidate, yet
  tests must keep every packet on loopback, and two peers on one machine have
  no need for any other interface. `set_local_description(..., local_only=True)`
  gathers 127.0.0.1 alone, through a wrapper around `aioice.ice.get_host_addresses`.
- SCTP tuning: `tune_sctp` swaps the class of a connection's `RTCSctpTransport`
  for a subclass with a capped congestion window and delayed SACKs.
- Bigger UDP socket buffers on the sockets aioice opened (`enlarge_socket_buffers`).

All of them rely on attributes aioice and aiortc do not document, so they live
here together; tests/test_patches.py checks that the installed versions still
have them, with the expected signatures, and that each patch still has its effect.
(`duet.transport.route` reads ICE's nominated pair the same way.)
"""
from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
from typing import Any, List, Optional

import aioice.ice
from aiortc import RTCPeerConnection, RTCSessionDescription

from .sdp import LOOPBACK

# UDP socket buffers asked of the OS (capped by net.core.rmem_max/wmem_max).
SOCKET_BUFFER = 8 << 20


# --------------------------------------------------------------------------
# Loopback-only gathering

# True while a coroutine that asked for loopback-only gathering runs
# setLocalDescription. A ContextVar (not a global flag) so that other peer
# connections gathering concurrently on the same loop are not affected: the
# tasks aiortc spawns for gathering copy the context of the caller.
_LOOPBACK_GATHERING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "duet_loopback_gathering", default=False)
_patch_lock = threading.Lock()
_patched = False


def install_loopback_patch() -> None:
    """Wrap aioice's host address lookup once, so it can answer 127.0.0.1 alone.

    aioice deliberately skips 127.0.0.1 in `get_host_addresses`; there is no
    option to ask for it. The wrapper defers to the original unless the
    current context asked for loopback-only gathering.
    """
    global _patched
    with _patch_lock:
        if _patched:
            return
        original = aioice.ice.get_host_addresses

        def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> List[str]:
            if _LOOPBACK_GATHERING.get():
                return [LOOPBACK] if use_ipv4 else []
            return original(use_ipv4, use_ipv6)

        get_host_addresses.__wrapped__ = original  # type: ignore[attr-defined]
        aioice.ice.get_host_addresses = get_host_addresses
        _patched = True


async def set_local_description(
    pc: RTCPeerConnection, desc: RTCSessionDescription, local_only: bool
) -> None:
    """setLocalDescription (which gathers candidates), loopback-only if asked."""
    if not local_only:
        await pc.setLocalDescription(desc)
        return
    install_loopback_patch()
    token = _LOOPBACK_GATHERING.set(True)
    try:
        await pc.setLocalDescription(desc)
    finally:
        _LOOPBACK_GATHERING.reset(token)


# --------------------------------------------------------------------------
# UDP socket buffers


def ice_sockets(pc: RTCPeerConnection) -> List[socket.socket]:
    """The UDP sockets aioice opened for this peer connection (aiortc internals)."""
    socks = []
    try:
        conn = pc.sctp.transport.transport.iceGatherer._connection  # type: ignore[union-attr]
        for proto in list(conn._protocols):
            tr = getattr(proto, "transport", None)
            sock = tr.get_extra_info("socket") if tr is not None else None
            if sock is not None:
                socks.append(sock)
    except AttributeError:  # a different aiortc/aioice layout: skip the tuning
        pass
    return socks


def enlarge_socket_buffers(pc: RTCPeerConnection, size: int = SOCKET_BUFFER) -> List[int]:
    """Ask for larger UDP buffers on the ICE sockets; returns the receive sizes granted.

    Why: aioice sets a 256 KiB receive buffer. A burst that overflows it drops
    datagrams, and aiortc's SCTP then waits for its retransmission timer
    (1 s minimum) with the congestion window collapsed. Failure is ignored.
    """
    granted = []
    for sock in ice_sockets(pc):
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
        try:
            granted.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        except OSError:
            pass
    return granted


# --------------------------------------------------------------------------
# SCTP tuning (aiortc internals, applied per connection)

# Measured here (benchmarks/transport_throughput.py): aiortc's SCTP sender is
# CPU bound, and each SACK it handles walks its whole queue of unacknowledged
# chunks. Its congestion window grows without bound on a lossless path and it
# ignores the receiver's advertised window, so with large socket buffers the
# flight grows to megabytes and every SACK costs more. Capping the window and
# acknowledging every second packet (RFC 9260 section 6.2 allows up to 200 ms
# of delay; we use a few ms) cuts the sender's work per byte.
CWND_MAX = 4 << 20
SACK_DELAY = 0.005
SACK_EVERY = 2

try:
    from aiortc.rtcsctptransport import RTCSctpTransport as _RTCSctpTransport
except ImportError:  # pragma: no cover - layout changed
    _RTCSctpTransport = None  # type: ignore[assignment,misc]


if _RTCSctpTransport is not None:

    class _TunedSctpTransport(_RTCSctpTransport):
        """aiortc's SCTP association with a capped window and delayed SACKs.

        Installed by swapping the class of an existing instance, so nothing
        changes for other connections in the process.
        """

        _duet_cwnd_max: int = CWND_MAX
        _duet_sack_every: int = SACK_EVERY
        _duet_sack_delay: float = SACK_DELAY

        @property
        def _cwnd(self) -> int:
            return self.__dict__["_duet_cwnd"]

        @_cwnd.setter
        def _cwnd(self, value: int) -> None:
            self.__dict__["_duet_cwnd"] = min(value, self._duet_cwnd_max)

        async def _send_sack(self) -> None:
            if (
                self._duet_sack_every > 1
                and self._association_state == self.State.ESTABLISHED
                and not self._sack_misordered
                and not self._sack_duplicates
            ):
                count = self.__dict__.get("_duet_sack_count", 0) + 1
                if count < self._duet_sack_every:
                    self.__dict__["_duet_sack_count"] = count
                    if self.__dict__.get("_duet_sack_timer") is None:
                        self.__dict__["_duet_sack_timer"] = self._loop.call_later(  # type: ignore[union-attr]
                            self._duet_sack_delay, self._duet_sack_due)
                    return
            self._duet_sack_now()
            await super()._send_sack()

        def _t3_expired(self) -> None:
            # Counted for diagnostics: each expiry is a stall of at least 1 s.
            self.__dict__["_duet_t3_expired"] = self.__dict__.get("_duet_t3_expired", 0) + 1
            super()._t3_expired()

        def _duet_sack_now(self) -> None:
            self.__dict__["_duet_sack_count"] = 0
            timer = self.__dict__.pop("_duet_sack_timer", None)
            if timer is not None:
                timer.cancel()

        def _duet_sack_due(self) -> None:
            self.__dict__["_duet_sack_timer"] = None
            if self._sack_needed and self._association_state == self.State.ESTABLISHED:
                self._duet_sack_now()
                asyncio.ensure_future(_RTCSctpTransport._send_sack(self))


def tune_sctp(pc: RTCPeerConnection, cwnd_max: Optional[int] = CWND_MAX,
              sack_every: int = SACK_EVERY) -> bool:
    """Apply the SCTP tuning above to this peer connection; False if not possible."""
    sctp = pc.sctp
    if _RTCSctpTransport is None or sctp is None or type(sctp) is not _RTCSctpTransport:
        return False
    if not hasattr(sctp, "_cwnd") or not hasattr(sctp, "_sack_needed"):
        return False
    cwnd = sctp.__dict__.pop("_cwnd")
    sctp.__class__ = _TunedSctpTransport
    tuned: Any = sctp  # now a _TunedSctpTransport
    tuned._duet_cwnd_max = cwnd_max or (1 << 62)
    tuned._duet_sack_every = max(1, sack_every)
    sctp._cwnd = cwnd
    return True


def t3_expirations(sctp: Any) -> int:
    """How often a tuned association's retransmission timer expired (0 when not tuned)."""
    return getattr(sctp, "__dict__", {}).get("_duet_t3_expired", 0)
