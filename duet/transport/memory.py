"""An in-process transport pair with the same semantics as WebRTC.

Why: the session, owner and scientist layers are tested against this without
networking, so it must behave like the real link: ordered delivery on the
runtime loop, thread-safe non-blocking `send`, messages that arrive before
`set_handlers` are held and delivered afterwards, and `close` reaching the
peer's `on_close`.
"""
from __future__ import annotations

import collections
import logging
from typing import Deque, List, Optional

from .. import runtime
from ..errors import ConnectionLost
from .base import CloseHandler, MessageHandler, Transport

log = logging.getLogger(__name__)


class MemoryTransport(Transport):
    """One end of a `memory_pair`. Callbacks run on the runtime loop thread."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.peer: Optional[MemoryTransport] = None
        self._loop = runtime.loop()
        # Outgoing messages from any thread; flushed to the peer on the loop.
        self._outbox: Deque[bytes] = collections.deque()
        self._flush_scheduled = False
        # Delivered to us but not yet consumed (no handlers yet).
        self._inbox: List[bytes] = []
        self._closed = False
        self._close_reason: Optional[BaseException] = None
        self._close_delivered = False
        self._peer_closed = False  # close seen (ours or the peer's) awaiting delivery
        self._dropped = False  # some sent messages were discarded by a close

    # -- sending -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue one message for the peer. Thread safe and non-blocking."""
        if self._closed:
            raise ConnectionLost(f"memory transport {self.name} is closed")
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"send() takes bytes, not {type(data).__name__}")
            data = bytes(data)  # the peer gets its own copy, as over a real link
        self._outbox.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if runtime.in_loop_thread():
                self._loop.call_soon(self._flush)
            else:
                self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        # Clear the flag before draining: a send that appends after the drain
        # then sees False and schedules another flush, so nothing is stranded.
        self._flush_scheduled = False
        out = self._outbox
        peer = self.peer
        batch: List[bytes] = []
        while True:
            try:
                batch.append(out.popleft())
            except IndexError:
                break
        if not batch:
            return
        if peer is None or peer._closed:
            self._dropped = True
            return
        peer._receive(batch)

    async def drain(self) -> None:
        """Hand every queued message to the peer now; ConnectionLost if some were dropped."""
        if self._outbox:
            self._flush()
        if self._dropped:
            raise ConnectionLost(f"memory transport {self.name} closed with messages undelivered")

    # -- receiving -----------------------------------------------------------

    def _receive(self, batch: List[bytes]) -> None:
        handler = self._on_message
        if handler is None or self._inbox:
            self._inbox.extend(batch)
            if handler is None:
                return
            batch, self._inbox = self._inbox, []
        for msg in batch:
            try:
                handler(msg)
            except Exception:  # a buggy handler must not break the pipe
                log.exception("on_message handler of %s raised", self.name)

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler) -> None:
        """Attach the receiver; earlier messages (and an earlier close) are delivered on the loop."""
        super().set_handlers(on_message, on_close)
        runtime.call_soon(self._deliver_backlog)

    def _deliver_backlog(self) -> None:
        if self._inbox and self._on_message is not None:
            self._receive([])
        if self._peer_closed:
            self._fire_close()

    def _fire_close(self) -> None:
        self._peer_closed = True
        if self._close_delivered or self._on_close is None or self._inbox:
            return
        self._close_delivered = True
        try:
            self._on_close(self._close_reason)
        except Exception:
            log.exception("on_close handler of %s raised", self.name)

    # -- closing -------------------------------------------------------------

    def _shutdown(self, reason: Optional[BaseException]) -> None:
        """Loop thread: mark closed and schedule on_close (after pending messages)."""
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._loop.call_soon(self._fire_close)

    async def close(self) -> None:
        """Deliver what was sent before, then close both ends. Idempotent."""
        if self._closed:
            return
        self._flush()  # messages sent before close() still arrive, in order
        self._shutdown(None)
        peer = self.peer
        if peer is not None:
            # The peer's own pending sends to us are dropped: we are gone.
            if peer._outbox:
                peer._outbox.clear()
                peer._dropped = True
            peer._shutdown(None)

    @property
    def closed(self) -> bool:
        return self._closed


def memory_pair() -> tuple[Transport, Transport]:
    """Two connected in-process transports, e.g. (owner side, scientist side)."""
    a = MemoryTransport("a")
    b = MemoryTransport("b")
    a.peer, b.peer = b, a
    return a, b
