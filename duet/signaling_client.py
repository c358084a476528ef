"""Client of the Duet signaling service (the ``duet_signaling`` package).

The service is untrusted: it only relays opaque strings between an owner and the
scientists in a room. Sealing those strings is the pairing layer's job; this
module only moves them, with every wait bounded and every failure turned into a
``SignalingError`` whose message tells a notebook user what to do.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from duet.errors import SignalingError

__all__ = ["SignalingClient", "SignalingEvent", "ws_endpoint"]

log = logging.getLogger("duet.signaling")

ROOM_ID_RE = re.compile(r"[0-9a-f]{16,64}")
ROLES = ("owner", "scientist")

#: Frames from the (untrusted) service larger than this are refused by tornado.
MAX_INCOMING_FRAME_BYTES = 4 * 1024 * 1024

#: Server error codes after which the service closes the connection.
FATAL_CODES = frozenset(
    {
        "too_large",
        "too_many_rooms",
        "too_many_connections",
        "no_room",
        "room_exists",
        "handshake_timeout",
        "room_full",
        "expired",
    }
)

_FRIENDLY: Dict[str, str] = {
    "no_room": "no such room: the join code is wrong, expired, or the owner has left",
    "room_exists": "this room already has an owner (is another Duet server using the same join code?)",
    "room_full": "the room is full: too many scientists are connected to this owner",
    "too_many_rooms": "the signaling service has too many open rooms; try again later",
    "too_many_connections": "the signaling service has too many connections; try again later",
    "handshake_timeout": "the signaling service gave up waiting for the join message",
    "too_large": "a signaling message was larger than the service accepts",
    "bad_message": "the signaling service rejected a malformed message",
    "rate_limited": "too many signaling messages per second; a message was dropped",
    "no_peer": "that peer is not (or no longer) in the room",
    "expired": "the room expired on the signaling service",
}

_ROOM_CLOSED: Dict[str, str] = {
    "owner_left": "the owner left, so the room was closed",
    "expired": "the room expired on the signaling service",
    "shutdown": "the signaling service shut down",
}


def _friendly(code: str, server_text: Any = None) -> str:
    text = _FRIENDLY.get(code)
    if text is None:
        text = f"the signaling service reported {code!r}"
        if isinstance(server_text, str) and server_text:
            text += f": {server_text[:200]}"
    return text


def _signaling_error(message: str, code: Optional[str] = None) -> SignalingError:
    err = SignalingError(message)
    err.code = code  # type: ignore[attr-defined]
    return err


def ws_endpoint(url: str) -> str:
    """Turn the service base URL (http(s)/ws(s)://host:port[/prefix]) into its WebSocket endpoint."""
    parsed = urllib.parse.urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parsed.scheme.lower())
    if scheme is None or not parsed.netloc:
        raise _signaling_error(
            f"invalid signaling service URL {url!r}: expected http(s)://host:port[/prefix]",
            "bad_url",
        )
    path = parsed.path.rstrip("/") + "/ws"
    return urllib.parse.urlunsplit((scheme, parsed.netloc, path, parsed.query, ""))


@dataclass
class SignalingEvent:
    """Something that arrived from the service.

    kind: ``"msg"`` (``peer``, ``data``), ``"peer_joined"`` / ``"peer_left"``
    (``peer``), ``"room_closed"`` (``code`` is the reason: ``owner_left``,
    ``expired`` or ``shutdown``; ``message`` explains), or ``"error"`` (``code``
    and ``message``; non-fatal ones such as ``rate_limited`` and ``no_peer``
    leave the connection open).
    """

    kind: str
    peer: Optional[str] = None
    data: Optional[str] = None
    code: Optional[str] = None
    message: Optional[str] = None


class _Closed:
    """Queue sentinel: the connection is over; ``recv`` raises from now on."""


_CLOSED = _Closed()


class SignalingClient:
    """One connection to a room of the signaling service, as owner or scientist."""

    peer_id: str

    def __init__(self, conn: WebSocketClientConnection, url: str, room: str, role: str, peer_id: str,
                 ice_servers: Optional[List[Dict[str, Any]]] = None) -> None:
        self._conn = conn
        self.url = url
        self.room = room
        self.role = role
        self.peer_id = peer_id
        # STUN/TURN servers the service offered at registration ([] when it offers none).
        self.ice_servers: List[Dict[str, Any]] = list(ice_servers or [])
        self._queue: "asyncio.Queue[Union[SignalingEvent, _Closed]]" = asyncio.Queue()
        self._closed = False
        self._finished = False
        self._close_message: Optional[str] = None
        self._close_code: Optional[str] = None
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # ------------------------------------------------------------- connecting
    @classmethod
    async def connect(cls, url: str, room: str, role: str, timeout: float = 10.0) -> "SignalingClient":
        """Connect to the service at ``url`` and join ``room`` as ``role``.

        Raises ``SignalingError`` (with ``.code`` set when the service refused)
        if the service is unreachable, does not answer within ``timeout``
        seconds, or refuses the join, e.g. ``no_room`` for a wrong or expired
        join code. Never waits longer than ``timeout`` in total.
        """
        if role not in ROLES:
            raise ValueError(f'role must be "owner" or "scientist", not {role!r}')
        if not isinstance(room, str) or not ROOM_ID_RE.fullmatch(room):
            raise ValueError("room must be 16 to 64 lowercase hex characters")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        endpoint = ws_endpoint(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = HTTPRequest(endpoint, connect_timeout=timeout, request_timeout=timeout)
        fut: "asyncio.Future[Any]" = websocket_connect(request, max_message_size=MAX_INCOMING_FRAME_BYTES)  # type: ignore[assignment]  # tornado returns a Future
        try:
            conn = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.add_done_callback(_close_if_connected)
            raise _signaling_error(
                f"timed out after {timeout:g} s connecting to the signaling service at {url}", "timeout"
            ) from None
        except HTTPClientError as exc:
            if exc.code == 599:  # tornado's own timeout
                raise _signaling_error(
                    f"timed out after {timeout:g} s connecting to the signaling service at {url}", "timeout"
                ) from None
            raise _signaling_error(
                f"could not reach the signaling service at {url}: HTTP {exc.code} "
                f"(is this the right URL and path prefix?)",
                "unreachable",
            ) from None
        except (OSError, StreamClosedError, WebSocketClosedError) as exc:
            detail = str(exc) or type(exc).__name__
            raise _signaling_error(f"could not reach the signaling service at {url}: {detail}", "unreachable") from None
        try:
            peer_id, ice = await cls._join(conn, url, room, role, deadline - loop.time(), timeout)
        except BaseException:
            conn.close()
            raise
        return cls(conn, url, room, role, peer_id, ice)

    @staticmethod
    async def _join(
        conn: WebSocketClientConnection, url: str, room: str, role: str, remaining: float, timeout: float
    ) -> Tuple[str, List[Dict[str, Any]]]:
        try:
            await conn.write_message(json.dumps({"op": "join", "room": room, "role": role}))
        except (WebSocketClosedError, StreamClosedError):
            pass  # the service may have refused us at once (e.g. too_many_connections); read why
        try:
            reply = await asyncio.wait_for(conn.read_message(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise _signaling_error(
                f"the signaling service at {url} did not answer the join within {timeout:g} s", "timeout"
            ) from None
        if reply is None:
            raise _signaling_error(
                f"the signaling service at {url} closed the connection during the join "
                f"(close code {conn.close_code})",
                "closed",
            )
        msg = _parse(reply)
        if msg is not None and msg.get("op") == "error" and isinstance(msg.get("code"), str):
            code = msg["code"]
            raise _signaling_error(_friendly(code, msg.get("message")), code)
        if msg is not None and msg.get("op") == "joined" and isinstance(msg.get("peer"), str):
            return msg["peer"], offered_ice_servers(msg.get("ice"), url)
        raise _signaling_error(f"the signaling service at {url} sent an unexpected reply to the join", "bad_reply")

    # ---------------------------------------------------------------- public
    @property
    def closed(self) -> bool:
        """True once the connection is over (closed by either side)."""
        return self._closed

    async def send(self, data: str, to: Optional[str] = None) -> None:
        """Relay ``data`` to the owner (scientist) or to peer ``to`` (owner; required)."""
        if not isinstance(data, str):
            raise TypeError("signaling data must be a str (sealed and encoded by the caller)")
        if self.role == "owner" and to is None:
            raise ValueError("the owner must say which peer to send to (to=peer_id)")
        if self._closed:
            raise _signaling_error(self._close_message or "the signaling connection is closed", self._close_code)
        msg: Dict[str, Any] = {"op": "send", "data": data}
        if to is not None:
            msg["to"] = to
        try:
            await self._conn.write_message(json.dumps(msg))
        except (WebSocketClosedError, StreamClosedError):
            raise _signaling_error(
                self._close_message or "the signaling connection closed while sending", self._close_code
            ) from None

    async def recv(self, timeout: Optional[float] = None) -> SignalingEvent:
        """Next event from the service.

        Raises ``TimeoutError`` if none arrives within ``timeout`` seconds and
        ``SignalingError`` once the connection is over and queued events are drained.
        """
        if timeout is None:
            item = await self._queue.get()
        else:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)  # later calls (and other waiters) fail too
            raise _signaling_error(self._close_message or "the signaling connection is closed", self._close_code)
        return item

    async def close(self) -> None:
        """Leave the room and close the connection. Safe to call more than once."""
        if self._close_message is None:
            self._close_message = "the signaling client was closed"
            self._close_code = "closed"
        self._closed = True
        self._conn.close()
        if not self._reader.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
            except (asyncio.TimeoutError, Exception):
                self._reader.cancel()
        self._finish()  # a reader cancelled early must still not leave recv() hanging

    async def __aenter__(self) -> "SignalingClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SignalingClient {self.role} peer={self.peer_id} {state}>"

    # --------------------------------------------------------------- reading
    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._conn.read_message()
                if frame is None:
                    break
                if not isinstance(frame, str):
                    continue
                event = self._to_event(_parse(frame))
                if event is not None:
                    self._queue.put_nowait(event)
        finally:
            self._closed = True
            if self._close_message is None:
                code, why = self._conn.close_code, self._conn.close_reason
                if code == 1009:
                    self._close_message, self._close_code = _friendly("too_large"), "too_large"
                elif why in _FRIENDLY:  # the service names its error code as close reason
                    self._close_message, self._close_code = _friendly(why), why
                else:
                    reason = f", {self._conn.close_reason}" if self._conn.close_reason else ""
                    self._close_message = f"the signaling service closed the connection (code {code}{reason})"
                    self._close_code = "closed"
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._queue.put_nowait(_CLOSED)

    def _to_event(self, msg: Optional[Dict[str, Any]]) -> Optional[SignalingEvent]:
        # Everything the service sends is untrusted: check types, drop the rest.
        if msg is None:
            return None
        op = msg.get("op")
        if op == "msg":
            peer, data = msg.get("from"), msg.get("data")
            if isinstance(peer, str) and isinstance(data, str):
                return SignalingEvent("msg", peer=peer, data=data)
        elif op in ("peer_joined", "peer_left"):
            peer = msg.get("peer")
            if isinstance(peer, str):
                return SignalingEvent(op, peer=peer)
        elif op == "room_closed":
            reason = msg.get("reason")
            reason = reason if isinstance(reason, str) else "unknown"
            text = _ROOM_CLOSED.get(reason, f"the room was closed ({reason[:50]})")
            self._close_message, self._close_code = text, reason
            return SignalingEvent("room_closed", code=reason, message=text)
        elif op == "error":
            code = msg.get("code")
            if isinstance(code, str):
                text = _friendly(code, msg.get("message"))
                if code in FATAL_CODES:
                    self._close_message, self._close_code = text, code
                return SignalingEvent("error", code=code, message=text)
        return None


MAX_OFFERED_SERVERS = 8
_SCHEMES = ("stun:", "turn:", "turns:")


def offered_ice_servers(value: Any, url: str) -> List[Dict[str, Any]]:
    """The ICE servers a service offered, if well formed; otherwise none (with a warning).

    The service is untrusted: a list it sends can only name servers to try, never change what
    the sealed pairing and DTLS protect (see SECURITY.md).
    """
    if value is None:
        return []
    servers: List[Dict[str, Any]] = []
    ok = isinstance(value, list) and len(value) <= MAX_OFFERED_SERVERS
    for item in value if ok else []:
        urls = item.get("urls") if isinstance(item, dict) else None
        user, cred = (item.get("username"), item.get("credential")) if isinstance(item, dict) else (None, None)
        if (not isinstance(urls, str) or not urls.startswith(_SCHEMES) or len(urls) > 256
                or any(c.isspace() for c in urls)
                or not all(v is None or (isinstance(v, str) and len(v) <= 256) for v in (user, cred))):
            ok = False
            break
        server: Dict[str, Any] = {"urls": urls}
        if user is not None:
            server.update(username=user, credential=cred)
        servers.append(server)
    if not ok:
        log.warning("the signaling service at %s offered a malformed ICE server list; ignoring it", url)
        return []
    return servers


def _parse(frame: Union[str, bytes, None]) -> Optional[Dict[str, Any]]:
    if not isinstance(frame, str):
        return None
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def _close_if_connected(fut: "asyncio.Future[WebSocketClientConnection]") -> None:
    # The connect finished after we gave up on it: do not leak the socket.
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()
