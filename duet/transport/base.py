"""The transport contract: a reliable, ordered pipe of whole messages.

The session layer sees only this. `send` is thread safe and never blocks, so a
notebook cell can pipeline many actions; the transport coalesces them into
frames and applies backpressure on its own loop.
"""
from __future__ import annotations

import abc
from typing import Callable, Optional

MessageHandler = Callable[[bytes], None]
CloseHandler = Callable[[Optional[BaseException]], None]
# (message bytes received so far, total bytes of that message); for progress bars.
ProgressHandler = Callable[[int, int], None]


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

    @abc.abstractmethod
    def send(self, data: bytes) -> None:
        """Queue one message. Thread safe, non-blocking. Raises ConnectionLost when closed."""

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
