"""The transport contract: a reliable, ordered pipe of whole messages.

The session layer sees only this. `send` is thread safe and never blocks, so a
notebook cell can pipeline many actions; the transport coalesces them into
frames and applies backpressure on its own loop.
"""
from __future__ import annotations

import abc
import logging
from typing import Callable, Optional, Protocol, Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]
# Receives each message as a buffer the transport hands over for good: it never reads, writes or
# reuses it again, so the receiver may keep views of it (duet.wire.decode(adopt=True)).
MessageHandler = Callable[[Buffer], None]
CloseHandler = Callable[[Optional[BaseException]], None]
# (message bytes received so far, total bytes of that message); for progress bars.
ProgressHandler = Callable[[int, int], None]


class Parts(Protocol):
    """A message as buffers not yet joined (duet.wire.Encoded); it keeps what they point into alive."""

    @property
    def parts(self) -> Sequence[Buffer]: ...

    @property
    def size(self) -> int: ...

    def join(self) -> bytes: ...

    def owned(self) -> "Parts":
        """The message with its own copy of any buffer its sender may still write (itself if none)."""
        ...


log = logging.getLogger("duet.transport")


class Transport(abc.ABC):
    """A message pipe between two peers. Callbacks run on the runtime loop thread."""

    def __init__(self) -> None:
        self._on_message: Optional[MessageHandler] = None
        self._on_close: Optional[CloseHandler] = None
        self.on_progress: Optional[ProgressHandler] = None

    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler) -> None:
        """Attach the receiver. Messages that arrived before are delivered then, in order."""
        self._on_message = on_message
        self._on_close = on_close

    def report_progress(self, received: int, total: int) -> None:
        """Tell `on_progress`, if set, how much of a large incoming message has arrived; its errors are logged."""
        cb = self.on_progress
        if cb is not None:
            try:
                cb(received, total)
            except Exception:
                log.exception("on_progress handler raised")

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Queue one message. Thread safe, non-blocking. Raises ConnectionLost when closed."""

    def send_parts(self, message: Parts) -> None:
        """Queue one message given as buffers; a transport that can send them as they are overrides this.

        The sender may change the values the buffers view as soon as this returns: a transport that
        keeps buffers to send later keeps `message.owned()`, and this default joins them now.
        """
        self.send(message.join())

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until every message queued so far was handed to the link."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close both directions; the peer's on_close fires. Idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once the pipe is closed, by either side or by failure."""
