"""Request/reply over a transport: matched by id, never by arrival order.

Fire-and-forget messages (actions) are pipelined; requests get a future that
resolves when the reply with the same id arrives, or fails with
ConnectionLost when the link closes. Every blocking wait has a timeout.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Callable, Dict, Optional

from . import wire
from .errors import ConnectionLost, ProtocolError, RequestTimeout
from .protocol import Msg, error_from_wire, error_to_wire
from .transport.base import Buffer, Transport

log = logging.getLogger("duet.session")

MessageHandler = Callable[[Dict[str, Any]], None]
LARGE_MESSAGE = 1 << 20  # from this size, messages go to the transport unjoined


class Session:
    """One peer link carrying dict messages; replies matched by request id."""

    def __init__(self, transport: Transport, name: str = "session", limits: wire.Limits = wire.DEFAULT_LIMITS,
                 bin_views: bool = False) -> None:
        self.transport = transport
        self.bin_views = bin_views  # large bins decode as memoryviews (the scientist's release payloads)
        self.name = name
        self.limits = limits
        self._ids = itertools.count(1)
        self._pending: Dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._handler: Optional[MessageHandler] = None
        self._close_callbacks: list = []
        self.close_reason: Optional[BaseException] = None
        self.last_message_bytes = 0
        self._closed = threading.Event()
        transport.set_handlers(self._on_bytes, self._on_close)

    # -- sending ---------------------------------------------------------------
    def send(self, msg: Dict[str, Any]) -> None:
        """Send without waiting (pipelined).

        The caller may change the tensors and arrays in `msg` as soon as this returns: what the peer
        gets is their value now (a large message is copied where a transport sends it later,
        `duet.wire.Encoded.owned`, unless its values were handed over with `encode_parts(owned=True)`).
        """
        if self._closed.is_set():
            raise ConnectionLost(self._closed_message())
        encoded = wire.encode_parts(msg)
        if encoded.size >= LARGE_MESSAGE:
            self.transport.send_parts(encoded)  # the fast path sends a tensor's memory as it is
        else:
            self.transport.send(encoded.join())

    def request(self, msg: Dict[str, Any]) -> "concurrent.futures.Future[Any]":
        """Send a request; the future resolves with the reply's value or the peer's error."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        req_id = next(self._ids)
        with self._lock:
            if self._closed.is_set():
                raise ConnectionLost(self._closed_message())
            self._pending[req_id] = fut
        try:
            self.send({**msg, "t": Msg.REQ, "id": req_id})
        except BaseException:
            with self._lock:
                self._pending.pop(req_id, None)
            raise
        fut.request_id = req_id  # type: ignore[attr-defined]
        return fut

    def call(self, msg: Dict[str, Any], timeout: float, what: str) -> Any:
        """Request and wait for the reply, at most `timeout` seconds."""
        fut = self.request(msg)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(f"{what}: no reply from the peer within {timeout} s") from None

    def reply(self, req_id: int, value: Any = None, error: Optional[BaseException] = None, op: str = "") -> None:
        if error is not None:
            msg = {"t": Msg.REP, "id": req_id, "ok": False, "error": error_to_wire(error, op)}
        else:
            msg = {"t": Msg.REP, "id": req_id, "ok": True, "value": value}
        try:
            self.send(msg)
        except ConnectionLost:
            log.info("%s: reply %s dropped, the link is closed", self.name, req_id)

    def reply_error(self, req_id: int, error: Dict[str, Any]) -> None:
        """Reply with an error already in wire form (an earlier failure, passed on as it was)."""
        try:
            self.send({"t": Msg.REP, "id": req_id, "ok": False, "error": error})
        except ConnectionLost:
            log.info("%s: reply %s dropped, the link is closed", self.name, req_id)

    # -- receiving -------------------------------------------------------------
    def set_handler(self, handler: MessageHandler) -> None:
        """Receive every message that is not a reply."""
        self._handler = handler

    def on_close(self, callback: Callable[[Optional[BaseException]], None]) -> None:
        self._close_callbacks.append(callback)
        if self._closed.is_set():
            callback(self.close_reason)

    def _on_bytes(self, data: "Buffer") -> None:
        self.last_message_bytes = len(data)  # for handlers that account queued bytes
        try:
            # The transport hands each message over for good (duet.transport.base): large
            # tensors and arrays are used where they arrived, when aligned, rather than copied.
            msg = wire.decode(data, self.limits, borrow=True, bin_views=self.bin_views, adopt=True)
            if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
                raise ProtocolError("a message must be a map with a string 't'")
        except ProtocolError as exc:
            log.warning("%s: dropped a malformed message: %s", self.name, exc)
            if self._handler is not None:
                self._handler({"t": Msg.INVALID, "error": exc})
            return
        if msg["t"] == Msg.REP:
            self._resolve(msg)
        elif self._handler is not None:
            self._handler(msg)

    def _resolve(self, msg: Dict[str, Any]) -> None:
        req_id = msg.get("id")
        with self._lock:
            fut = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
        if fut is None:
            log.debug("%s: reply for unknown request %r", self.name, req_id)
            return
        if msg.get("ok") is True:
            fut.set_result(msg.get("value"))
        else:
            fut.set_exception(error_from_wire(msg.get("error")))

    def _on_close(self, reason: Optional[BaseException]) -> None:
        if self._closed.is_set():
            return
        if self.close_reason is None:
            self.close_reason = reason
        self._closed.set()
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(self._closed_message()))
        for cb in list(self._close_callbacks):
            try:
                cb(reason)
            except Exception:
                log.exception("%s: close callback failed", self.name)

    def _closed_message(self) -> str:
        why = f": {self.close_reason}" if self.close_reason else ""
        return f"the link to the peer is closed{why}"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float) -> bool:
        return self._closed.wait(timeout)

    async def close(self) -> None:
        await self.transport.close()
        self._on_close(None)
