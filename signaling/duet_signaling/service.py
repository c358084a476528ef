"""The signaling relay: rooms, a tiny JSON protocol over WebSocket, limits, expiry.

Why it looks like this:

* The service is untrusted (docs/design.md, section 6 "Security rules", rule 5). It sees only an opaque
  room id derived from the join secret and sealed payloads it cannot read. So it
  needs no authentication of its own: knowing the room id *is* the capability,
  which is also why ``check_origin`` accepts every origin.
* A public relay is an easy target for abuse, so every resource is bounded:
  message size, message rate per connection, peers per room, rooms, connections,
  idle time and (optionally) absolute lifetime of a room, and the time a fresh
  connection may take to say which room it wants.
* Nothing is written to disk and nothing secret-shaped is logged: logs and
  ``stats()`` carry counts and at most a short room-id prefix, never payloads.
* It is plain tornado on whatever asyncio loop is current, so the same handlers
  can run standalone (``start`` / ``python -m duet_signaling``) or be mounted in
  a Jupyter server (``make_handlers``).

Protocol (JSON text frames):

* first frame: ``{"op":"join","room":ROOM,"role":"owner"|"scientist"}`` ->
  ``{"op":"joined","peer":PEER_ID}``; the owner's peer id is ``"owner"``.
* scientist ``{"op":"send","data":STR}`` -> owner gets
  ``{"op":"msg","from":ID,"data":STR}``; owner ``{"op":"send","to":ID,"data":STR}``
  -> that scientist gets ``{"op":"msg","from":"owner","data":STR}``.
* owner is told ``peer_joined`` / ``peer_left``; when the owner leaves, the room
  expires or the service shuts down, everyone left gets
  ``{"op":"room_closed","reason":"owner_left"|"expired"|"shutdown"}`` and is closed.
* errors: ``{"op":"error","code":CODE,"message":TEXT}``; fatal ones are followed
  by a close of the socket.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from .ice import IceOffer

log = logging.getLogger("duet_signaling")

PROTOCOL_VERSION = 1

#: Room ids are opaque lowercase hex strings, derived by clients from a secret.
ROOM_ID_RE = re.compile(r"[0-9a-f]{16,64}")
ROLES = ("owner", "scientist")
OWNER_PEER_ID = "owner"

ERROR_CODES = frozenset(
    {
        "bad_message",
        "too_large",
        "rate_limited",
        "room_full",
        "too_many_rooms",
        "too_many_connections",
        "no_room",
        "room_exists",
        "no_peer",
        "handshake_timeout",
        "expired",
    }
)
#: Codes after which the service always closes the socket. ``bad_message`` is
#: fatal only before a successful join; ``rate_limited`` only after sustained abuse.
FATAL_CODES = frozenset(
    {
        "too_large",
        "too_many_rooms",
        "too_many_connections",
        "no_room",
        "room_exists",
        "handshake_timeout",
        "room_full",
    }
)

# WebSocket close codes (RFC 6455).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

_PING_INTERVAL_SECONDS = 30.0


@dataclass
class Limits:
    """Every resource a client can make the service spend is bounded here.

    ``peers_per_room`` counts every connection in a room, the owner included.
    ``room_idle_seconds`` closes a room with no traffic (joins or relayed
    messages) for that long; ``room_ttl_seconds`` (optional) closes it that long
    after creation regardless of traffic.
    """

    max_message_bytes: int = 65536
    messages_per_second: float = 50.0
    burst_messages: int = 100
    peers_per_room: int = 32
    max_rooms: int = 10000
    max_connections: int = 5000
    room_idle_seconds: float = 3600.0
    room_ttl_seconds: Optional[float] = None
    handshake_timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        positive = {
            "max_message_bytes": self.max_message_bytes,
            "messages_per_second": self.messages_per_second,
            "burst_messages": self.burst_messages,
            "max_rooms": self.max_rooms,
            "max_connections": self.max_connections,
            "room_idle_seconds": self.room_idle_seconds,
            "handshake_timeout_seconds": self.handshake_timeout_seconds,
        }
        if self.room_ttl_seconds is not None:
            positive["room_ttl_seconds"] = self.room_ttl_seconds
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        if not isinstance(self.peers_per_room, int) or self.peers_per_room < 2:
            raise ValueError(
                f"Limits.peers_per_room must be at least 2 (the owner and one scientist), "
                f"got {self.peers_per_room!r}"
            )

    def as_dict(self) -> Dict[str, Any]:
        """Plain dict, for stats and health pages."""
        return dataclasses.asdict(self)

    def sweep_interval(self) -> float:
        """How often to look for expired rooms: small relative to idle/ttl, at most 1 s."""
        candidates = [1.0, self.room_idle_seconds / 4]
        if self.room_ttl_seconds is not None:
            candidates.append(self.room_ttl_seconds / 4)
        return max(0.005, min(candidates))

    def tornado_max_message_size(self) -> int:
        """Hard frame limit for tornado, above ours so that we can answer ``too_large``
        clearly for moderately oversized frames; tornado closes (1009) beyond it."""
        return 2 * self.max_message_bytes + 4096


def _room_tag(room_id: str) -> str:
    """A log-safe label for a room: a short prefix, never the full id."""
    return room_id[:6] + "..."


class _Room:
    """One owner and up to ``peers_per_room - 1`` scientists."""

    __slots__ = ("room_id", "owner", "scientists", "created", "last_activity", "relayed")

    def __init__(self, room_id: str, owner: "SignalingWebSocket", now: float) -> None:
        self.room_id = room_id
        self.owner = owner
        self.scientists: Dict[str, SignalingWebSocket] = {}
        self.created = now
        self.last_activity = now
        self.relayed = 0

    @property
    def tag(self) -> str:
        return _room_tag(self.room_id)

    def peer_count(self) -> int:
        return 1 + len(self.scientists)


class SignalingState:
    """All rooms and connections of one service instance, in memory only.

    Kept separate from the handlers so that one state can back several mounts
    and so that tests and operators can inspect it through ``stats()``.
    """

    def __init__(self, limits: Optional[Limits] = None, ice: Optional[IceOffer] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits if limits is not None else Limits()
        self.ice = ice if ice is not None else IceOffer()
        # Seconds for room idle/ttl expiry and the per-connection token buckets; injectable so
        # tests move time instead of waiting for it. (Shutdown deadlines stay on real time.)
        self.clock = clock
        self._rooms: Dict[str, _Room] = {}
        self._connections: Set[SignalingWebSocket] = set()
        self._sweeper: Optional[asyncio.Task] = None
        self._closed = False
        self._counters: Dict[str, int] = {
            "connections_total": 0,
            "rooms_created": 0,
            "rooms_expired": 0,
            "messages_relayed": 0,
            "errors_sent": 0,
        }

    # ----------------------------------------------------------------- public
    @property
    def room_count(self) -> int:
        return len(self._rooms)

    @property
    def peer_count(self) -> int:
        return sum(room.peer_count() for room in self._rooms.values())

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def health(self) -> Dict[str, Any]:
        """What ``/health`` returns: liveness and coarse load, nothing identifying."""
        return {"status": "ok", "rooms": self.room_count, "peers": self.peer_count}

    def stats(self) -> Dict[str, Any]:
        """Counts for operators. Never contains room ids or payloads."""
        return {
            "rooms": self.room_count,
            "peers": self.peer_count,
            "connections": self.connection_count,
            "limits": self.limits.as_dict(),
            "counters": dict(self._counters),
        }

    def sweep(self, now: Optional[float] = None) -> int:
        """Close rooms that have been idle too long or outlived their TTL.

        Runs periodically on its own; public so it can be driven directly.
        Returns the number of rooms closed.
        """
        now = self.clock() if now is None else now
        idle = self.limits.room_idle_seconds
        ttl = self.limits.room_ttl_seconds
        expired = [
            room
            for room in self._rooms.values()
            if now - room.last_activity >= idle or (ttl is not None and now - room.created >= ttl)
        ]
        for room in expired:
            self._counters["rooms_expired"] += 1
            self._close_room(room, "expired", close_owner=True)
        return len(expired)

    async def close(self, timeout: float = 5.0) -> None:
        """Close every room and connection (reason ``shutdown``) and stop the sweeper.

        Waits up to ``timeout`` seconds for the connections to finish closing.
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for room in list(self._rooms.values()):
            self._close_room(room, "shutdown", close_owner=True)
        for conn in list(self._connections):
            conn._close_quietly(CLOSE_GOING_AWAY, "shutdown")
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):  # stragglers: drop the TCP connection
            conn._abort()
        self._connections.clear()

    # --------------------------------------------------------------- internal
    def _ensure_sweeper(self) -> None:
        if self._closed:
            return
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        # Runs while anything is connected; restarted by the next connection.
        while not self._closed and (self._connections or self._rooms):
            await asyncio.sleep(self.limits.sweep_interval())
            try:
                self.sweep()
            except Exception:  # pragma: no cover - must never kill the sweeper
                log.exception("signaling sweep failed")

    def _register(self, conn: "SignalingWebSocket") -> bool:
        if self._closed or len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(conn)
        self._counters["connections_total"] += 1
        return True

    def _unregister(self, conn: "SignalingWebSocket") -> None:
        self._connections.discard(conn)

    def _join(self, conn: "SignalingWebSocket", room_id: str, role: str) -> Optional[Tuple[str, str]]:
        """Put ``conn`` into a room. Returns None on success, else (code, message)."""
        now = self.clock()
        room = self._rooms.get(room_id)
        if role == "owner":
            if room is not None:
                return ("room_exists", "an owner is already in this room")
            if len(self._rooms) >= self.limits.max_rooms:
                return ("too_many_rooms", "the signaling service has too many open rooms; try again later")
            room = _Room(room_id, conn, now)
            self._rooms[room_id] = room
            self._counters["rooms_created"] += 1
            conn.room, conn.role, conn.peer_id = room, "owner", OWNER_PEER_ID
            log.info("room %s opened (%d rooms)", room.tag, len(self._rooms))
            return None
        if room is None:
            return ("no_room", "no such room: the join code is wrong, expired, or the owner has left")
        if room.peer_count() >= self.limits.peers_per_room:
            return ("room_full", f"the room is full ({self.limits.peers_per_room} peers)")
        peer_id = secrets.token_hex(4)
        while peer_id in room.scientists or peer_id == OWNER_PEER_ID:  # pragma: no cover
            peer_id = secrets.token_hex(4)
        room.scientists[peer_id] = conn
        room.last_activity = now
        conn.room, conn.role, conn.peer_id = room, "scientist", peer_id
        log.info("room %s: a scientist joined (%d peers)", room.tag, room.peer_count())
        room.owner._send_json({"op": "peer_joined", "peer": peer_id})
        return None

    def _leave(self, conn: "SignalingWebSocket") -> None:
        room = conn.room
        if room is None:
            return
        conn.room = None
        if room.owner is conn:
            self._close_room(room, "owner_left", close_owner=False)
        elif room.scientists.get(conn.peer_id or "") is conn:
            del room.scientists[conn.peer_id or ""]
            log.info("room %s: a scientist left (%d peers)", room.tag, room.peer_count())
            room.owner._send_json({"op": "peer_left", "peer": conn.peer_id})

    def _close_room(self, room: _Room, reason: str, close_owner: bool) -> None:
        if self._rooms.get(room.room_id) is room:
            del self._rooms[room.room_id]
        members = list(room.scientists.values())
        room.scientists.clear()
        if close_owner:
            members.append(room.owner)
        for member in members:
            member.room = None
            member._send_json({"op": "room_closed", "reason": reason})
            member._close_quietly(CLOSE_GOING_AWAY if reason == "shutdown" else CLOSE_NORMAL, reason)
        if room.owner.room is room:
            room.owner.room = None
        log.info(
            "room %s closed (%s) after %d relayed messages; %d rooms open",
            room.tag,
            reason,
            room.relayed,
            len(self._rooms),
        )

    def _relay(self, room: _Room, target: "SignalingWebSocket", sender_id: str, data: str) -> None:
        room.last_activity = self.clock()
        room.relayed += 1
        self._counters["messages_relayed"] += 1
        target._send_json({"op": "msg", "from": sender_id, "data": data})


def _consume_future_error(fut: "asyncio.Future[Any]") -> None:
    # A write to a peer that just vanished fails; that is expected, not worth a traceback.
    if not fut.cancelled():
        fut.exception()


class SignalingWebSocket(tornado.websocket.WebSocketHandler):
    """One client connection. Speaks the JSON protocol described in the module docstring."""

    def initialize(self, state: SignalingState) -> None:
        self.state = state
        self.room: Optional[_Room] = None
        self.role: Optional[str] = None
        self.peer_id: Optional[str] = None
        self._joined = False
        self._closing = False
        self._registered = False
        self._tokens = float(state.limits.burst_messages)
        self._last_refill = state.clock()
        self._strikes = 0
        self._handshake_timer: Optional[asyncio.TimerHandle] = None

    # --------------------------------------------------- tornado configuration
    def check_origin(self, origin: str) -> bool:
        """Any origin may connect: the room id is the capability and payloads are sealed."""
        return True

    @property
    def max_message_size(self) -> int:
        return self.state.limits.tornado_max_message_size()

    @property
    def ping_interval(self) -> Optional[float]:
        # Detect dead peers so their rooms do not linger until the idle timeout.
        return _PING_INTERVAL_SECONDS

    def get_compression_options(self) -> Optional[Dict[str, Any]]:
        return None  # no permessage-deflate: nothing to gain on sealed payloads

    # ------------------------------------------------------------- lifecycle
    def open(self, *args: Any, **kwargs: Any) -> None:
        if not self.state._register(self):
            self._fail(
                "too_many_connections",
                "the signaling service has too many connections; try again later",
                close_code=CLOSE_TRY_AGAIN_LATER,
            )
            return
        self._registered = True
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.state.limits.handshake_timeout_seconds, self._on_handshake_timeout
        )
        self.state._ensure_sweeper()

    def on_close(self) -> None:
        self._closing = True
        self._cancel_handshake_timer()
        self.state._leave(self)
        self.state._unregister(self)

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self._joined and not self._closing:
            self._fail(
                "handshake_timeout",
                f"no join message within {self.state.limits.handshake_timeout_seconds} s",
            )

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    # -------------------------------------------------------------- messages
    def on_message(self, message: Any) -> None:
        if self._closing or not self._registered:
            return
        limits = self.state.limits
        if isinstance(message, bytes):
            self._bad("binary frames are not accepted; send JSON text", close_code=CLOSE_UNSUPPORTED)
            return
        if len(message) > limits.max_message_bytes or len(message.encode("utf-8")) > limits.max_message_bytes:
            self._fail(
                "too_large",
                f"message larger than {limits.max_message_bytes} bytes",
                close_code=CLOSE_TOO_BIG,
            )
            return
        if not self._take_token():
            return
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):
            self._bad("message is not valid JSON")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            self._bad('message must be a JSON object with a string "op"')
            return
        op = msg["op"]
        if not self._joined:
            if op != "join":
                self._bad('the first message must be {"op": "join", ...}')
                return
            self._handle_join(msg)
            return
        if op == "send":
            self._handle_send(msg)
        elif op == "join":
            self._bad("already joined")
        else:
            self._bad("unknown op")

    def _take_token(self) -> bool:
        limits = self.state.limits
        now = self.state.clock()
        self._tokens = min(
            float(limits.burst_messages),
            self._tokens + (now - self._last_refill) * limits.messages_per_second,
        )
        self._last_refill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._strikes = 0
            return True
        self._strikes += 1
        if self._strikes > max(100, 4 * limits.burst_messages):
            self._fail("rate_limited", "too many messages; closing", close_code=CLOSE_POLICY, fatal=True)
        else:
            self._error(
                "rate_limited",
                f"more than {limits.messages_per_second:g} messages per second; message dropped",
            )
        return False

    def _handle_join(self, msg: Dict[str, Any]) -> None:
        room_id, role = msg.get("room"), msg.get("role")
        if not isinstance(room_id, str) or not ROOM_ID_RE.fullmatch(room_id):
            self._bad("room must be 16 to 64 lowercase hex characters")
            return
        if role not in ROLES:
            self._bad('role must be "owner" or "scientist"')
            return
        problem = self.state._join(self, room_id, role)
        if problem is not None:
            code, text = problem
            self._fail(code, text, close_code=CLOSE_TRY_AGAIN_LATER if code.startswith("too_many") else CLOSE_POLICY)
            return
        self._joined = True
        self._cancel_handshake_timer()
        reply: Dict[str, Any] = {"op": "joined", "peer": self.peer_id}
        if not self.state.ice.empty:  # before any offer: the peer gathers candidates with these
            reply["ice"] = self.state.ice.servers_for(f"{role}-{(self.peer_id or '')[:8]}")
        self._send_json(reply)

    def _handle_send(self, msg: Dict[str, Any]) -> None:
        data = msg.get("data")
        if not isinstance(data, str):
            self._bad('"data" must be a string')
            return
        room = self.room
        if room is None:  # room closed under us; we are being closed too
            return
        to = msg.get("to")
        if self.role == "owner":
            if not isinstance(to, str):
                self._bad('the owner must say "to" which peer')
                return
            target = room.scientists.get(to)
            if target is None:
                self._error("no_peer", "no such peer in this room (it may have left)")
                return
            self.state._relay(room, target, OWNER_PEER_ID, data)
        else:
            if to is not None and to != OWNER_PEER_ID:
                self._error("no_peer", "scientists can only send to the owner")
                return
            self.state._relay(room, room.owner, self.peer_id or "", data)

    # ----------------------------------------------------------------- output
    def _send_json(self, obj: Dict[str, Any]) -> None:
        conn = self.ws_connection
        if conn is None or conn.is_closing():
            return
        try:
            fut = self.write_message(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))
        except tornado.websocket.WebSocketClosedError:
            return
        fut.add_done_callback(_consume_future_error)

    def _error(self, code: str, message: str) -> None:
        self.state._counters["errors_sent"] += 1
        log.debug("signaling error %s sent to a %s", code, self.role or "new connection")
        self._send_json({"op": "error", "code": code, "message": message})

    def _bad(self, message: str, close_code: int = CLOSE_POLICY) -> None:
        # bad_message is fatal before the join (we do not know who this is) and
        # a warning afterwards (a buggy client should not lose its room).
        self._fail("bad_message", message, close_code=close_code, fatal=not self._joined)

    def _fail(self, code: str, message: str, close_code: int = CLOSE_POLICY, fatal: bool = True) -> None:
        self._error(code, message)
        if fatal:
            self._closing = True
            self._cancel_handshake_timer()
            self.state._leave(self)
            self._close_quietly(close_code, code)

    def _close_quietly(self, code: int, reason: str) -> None:
        self._closing = True
        self._cancel_handshake_timer()
        try:
            self.close(code, reason)
        except Exception:  # pragma: no cover - already closed
            pass

    def _abort(self) -> None:
        conn = self.ws_connection
        if conn is not None:
            conn._abort()


class HealthHandler(tornado.web.RequestHandler):
    """``GET {prefix}/health`` -> ``{"status":"ok","rooms":N,"peers":N}``."""

    def initialize(self, state: SignalingState) -> None:
        self.state = state

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(self.state.health()))


def _normalize_prefix(prefix: str) -> str:
    prefix = (prefix or "").rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


def make_handlers(state: SignalingState, prefix: str = "") -> List[Tuple[str, Any, Dict[str, Any]]]:
    """Tornado URL specs for ``{prefix}/ws`` and ``{prefix}/health``.

    Separate from ``make_app`` so a Jupyter server extension can mount the very
    same handlers under its base URL.
    """
    base = re.escape(_normalize_prefix(prefix))
    kwargs = {"state": state}
    return [
        (base + r"/ws", SignalingWebSocket, kwargs),
        (base + r"/health", HealthHandler, kwargs),
    ]


def make_app(
    state: Optional[SignalingState] = None,
    limits: Optional[Limits] = None,
    prefix: str = "",
) -> tornado.web.Application:
    """A standalone tornado application serving the signaling handlers."""
    if state is None:
        state = SignalingState(limits)
    elif limits is not None and limits != state.limits:
        raise ValueError("pass limits either directly or through the state, not both")
    app = tornado.web.Application(make_handlers(state, prefix))
    app.settings["duet_signaling_state"] = state
    return app


class RunningService:
    """A started service: where it listens, its state, and how to stop it."""

    def __init__(
        self,
        server: tornado.httpserver.HTTPServer,
        state: SignalingState,
        host: str,
        port: int,
        prefix: str = "",
    ) -> None:
        self._server = server
        self.state = state
        self.host = host
        self.port = port
        self.prefix = _normalize_prefix(prefix)
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL clients pass to ``SignalingClient.connect``, e.g. ``http://127.0.0.1:8765``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.prefix}"

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close every room and connection. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.stop()
        await self.state.close(timeout=timeout)
        try:
            await asyncio.wait_for(self._server.close_all_connections(), timeout)
        except asyncio.TimeoutError:  # pragma: no cover
            log.warning("some HTTP connections did not close within %s s", timeout)

    def __repr__(self) -> str:
        return f"<RunningService {self.url} rooms={self.state.room_count}>"


async def start(
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Optional[Limits] = None,
    prefix: str = "",
    ice: Optional[IceOffer] = None,
) -> RunningService:
    """Start a signaling service on the current asyncio loop.

    ``port=0`` picks a free port (read it from ``.port`` / ``.url``). The
    service runs until ``await service.stop()``. ``ice``: the STUN/TURN servers
    handed to every peer when it registers (with per-registration TURN credentials).
    """
    state = SignalingState(limits, ice)
    app = make_app(state=state, prefix=prefix)
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    bound_port = sockets[0].getsockname()[1]
    log.info("duet-signaling listening on %s:%d", host, bound_port)
    return RunningService(server, state, host, bound_port, prefix)
