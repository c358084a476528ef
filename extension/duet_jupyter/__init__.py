"""Duet signaling inside a running Jupyter server (``duet_jupyter``).

Mounts the very handlers of ``duet_signaling`` under ``<base_url>duet/`` of the
server, so a team that already runs Jupyter (or JupyterHub) needs no second
service to pair:

* ``<base_url>duet/ws``      the relay WebSocket (no Jupyter auth: the room id,
                             derived from the join code's secret, is the
                             capability, and the relay sees only sealed payloads)
* ``<base_url>duet/health``  liveness and coarse counts (no Jupyter auth)
* ``<base_url>duet/``        status page for people, HTML (Jupyter auth)
* ``<base_url>duet/status``  the same as JSON (Jupyter auth)

The signaling URL users pass to ``duet.launch(signaling=...)`` is
``http(s)://<host>:<port><base_url>duet``; from a notebook kernel
``duet.launch(signaling="jupyter")`` finds it (see :mod:`duet_jupyter.discovery`).

Limits are configurable like any Jupyter option, e.g. in
``jupyter_server_config.py``::

    c.DuetSignaling.max_rooms = 100

This module adds no relay logic: it only mounts ``duet_signaling`` and renders
its ``stats()``. It never imports ``duet``, and it imports ``jupyter_server``
only when available, so that ``duet_jupyter.discovery`` also works from a kernel
whose environment lacks ``jupyter_server``.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from traitlets import Float, Integer, Unicode
from traitlets import List as ListTrait
from traitlets.config import Configurable

from duet_signaling import Limits, SignalingState, make_handlers
from duet_signaling.ice import DEFAULT_TTL_SECONDS, IceOffer
from duet_signaling.service import HealthHandler, SignalingWebSocket

__all__ = [
    "DuetSignaling",
    "MOUNT",
    "STATE_SETTING",
    "_jupyter_server_extension_points",
    "_load_jupyter_server_extension",
]

#: Path segment under the server's ``base_url`` where everything is mounted.
MOUNT = "duet"
#: Key in ``serverapp.web_app.settings`` holding the :class:`SignalingState`.
STATE_SETTING = "duet_signaling_state"

_DEFAULTS = Limits()


class DuetSignaling(Configurable):
    """Limits of the Duet signaling relay mounted in this Jupyter server.

    The relay is reachable without a Jupyter token (a scientist holding a join
    code has none), so every resource it can spend is bounded here. Defaults
    match the standalone ``duet-signaling`` service, except ``max_rooms`` and
    ``max_connections``, which are sized for one team's server.
    """

    max_rooms = Integer(
        256, config=True, help="Rooms (one per running Duet owner) open at once; more are refused."
    )
    max_connections = Integer(
        1024, config=True, help="Relay WebSocket connections open at once; more are refused."
    )
    peers_per_room = Integer(
        _DEFAULTS.peers_per_room, config=True, help="Connections per room, the owner included (at least 2)."
    )
    max_message_bytes = Integer(
        _DEFAULTS.max_message_bytes, config=True, help="Largest relayed message, in bytes."
    )
    messages_per_second = Float(
        _DEFAULTS.messages_per_second, config=True, help="Sustained messages per second per connection."
    )
    burst_messages = Integer(
        _DEFAULTS.burst_messages, config=True, help="Burst allowance of messages per connection."
    )
    room_idle_seconds = Float(
        _DEFAULTS.room_idle_seconds, config=True, help="A room with no traffic for this long is closed."
    )
    room_ttl_seconds = Float(
        None,
        allow_none=True,
        config=True,
        help="If set, a room is closed this long after it was opened, whatever its traffic.",
    )
    handshake_timeout_seconds = Float(
        _DEFAULTS.handshake_timeout_seconds,
        config=True,
        help="Time a new connection has to say which room it joins.",
    )

    ice_servers = ListTrait(
        Unicode(), default_value=[], config=True,
        help="STUN servers handed to every peer at registration, e.g. ['stun:turn.example.org:3478'].",
    )
    turn_urls = ListTrait(
        Unicode(), default_value=[], config=True,
        help="TURN servers handed to every peer with credentials made for it (needs turn_secret).",
    )
    turn_secret = Unicode(
        "", config=True,
        help="coturn's static-auth-secret (use-auth-secret); $DUET_TURN_SECRET when empty. Never sent to peers.",
    )
    turn_ttl_seconds = Float(DEFAULT_TTL_SECONDS, config=True, help="How long handed-out TURN credentials stay valid.")

    def ice(self) -> IceOffer:
        """The ICE servers to offer; raises ``ValueError`` naming a bad value."""
        return IceOffer(stun_urls=list(self.ice_servers), turn_urls=list(self.turn_urls),
                        turn_secret=self.turn_secret or os.environ.get("DUET_TURN_SECRET") or None,
                        ttl_seconds=self.turn_ttl_seconds)

    def limits(self) -> Limits:
        """The configured limits; raises ``ValueError`` naming a bad value."""
        return Limits(
            max_message_bytes=self.max_message_bytes,
            messages_per_second=self.messages_per_second,
            burst_messages=self.burst_messages,
            peers_per_room=self.peers_per_room,
            max_rooms=self.max_rooms,
            max_connections=self.max_connections,
            room_idle_seconds=self.room_idle_seconds,
            room_ttl_seconds=self.room_ttl_seconds,
            handshake_timeout_seconds=self.handshake_timeout_seconds,
        )


def _jupyter_server_extension_points() -> List[Dict[str, str]]:
    """Entry point jupyter_server looks up: this module is the extension."""
    return [{"module": "duet_jupyter"}]


try:  # the server side; discovery (run in kernels) must not need jupyter_server
    from jupyter_server.auth.decorator import allow_unauthenticated, authorized
    from jupyter_server.base.handlers import APIHandler, JupyterHandler
    from jupyter_server.utils import url_path_join
    from tornado import web
except ImportError as _exc:  # pragma: no cover - exercised only without jupyter_server
    _JUPYTER_IMPORT_ERROR: Optional[ImportError] = _exc
else:
    _JUPYTER_IMPORT_ERROR = None

    class JupyterSignalingWebSocket(SignalingWebSocket):
        """The relay WebSocket, explicitly public to Jupyter's auth layer.

        Capability-protected instead: a connection can only reach the room whose
        id it names, and that id comes from the join code's 128-bit secret.
        """

        @allow_unauthenticated
        async def get(self, *args: Any, **kwargs: Any) -> None:
            await super().get(*args, **kwargs)

    class JupyterHealthHandler(HealthHandler):
        """``/duet/health``: liveness and coarse counts, public (used by discovery)."""

        @allow_unauthenticated
        def get(self) -> None:
            super().get()

    class _StatusMixin:
        auth_resource = "duet"

        def initialize(self, state: SignalingState) -> None:
            self.state = state

        def _status(self) -> Dict[str, Any]:
            # stats() carries counts and limits only: never room ids or payloads.
            status = dict(self.state.stats())
            base = url_path_join(self.base_url, MOUNT)  # type: ignore[attr-defined]
            status["endpoints"] = {"ws": base + "/ws", "health": base + "/health", "status": base + "/status"}
            return status

    class StatusAPIHandler(_StatusMixin, APIHandler):
        """``/duet/status``: the status as JSON, for Jupyter-authenticated users."""

        @web.authenticated
        @authorized
        def get(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps(self._status()))

    class StatusPageHandler(_StatusMixin, JupyterHandler):
        """``/duet/``: a small human status page, for Jupyter-authenticated users."""

        @web.authenticated
        @authorized
        def get(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(_render_status(self._status(), self.request.protocol, self.request.host))


def _render_status(status: Dict[str, Any], protocol: str, host: str) -> str:
    esc = html.escape

    def table(rows: Dict[str, Any]) -> str:
        cells = "".join(
            f"<tr><th>{esc(str(k))}</th><td>{esc('-' if v is None else str(v))}</td></tr>" for k, v in rows.items()
        )
        return f"<table>{cells}</table>"

    ws_path = status["endpoints"]["ws"]
    signaling_url = f"{protocol}://{host}{ws_path[: -len('/ws')]}"
    now = {"rooms open": status["rooms"], "peers in rooms": status["peers"], "connections": status["connections"]}
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Duet signaling</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:46em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "th{font-weight:normal;color:#444}code{background:#f4f4f4;padding:0 .2em}</style></head><body>"
        "<h1>Duet signaling</h1>"
        "<p>This Jupyter server relays Duet pairing messages. It sees only room ids derived from "
        "join codes and sealed payloads; it can neither read nor alter them.</p>"
        f"<p>Signaling URL: <code>{esc(signaling_url)}</code> (from a notebook on this server: "
        "<code>duet.launch(signaling=\"jupyter\")</code>).</p>"
        f"<h2>Now</h2>{table(now)}"
        f"<h2>Since start</h2>{table(status['counters'])}"
        f"<h2>Limits</h2>{table(status['limits'])}"
        f"<p><a href='{esc(status['endpoints']['status'], quote=True)}'>as JSON</a></p>"
        "</body></html>"
    )


def make_jupyter_handlers(state: SignalingState, base_url: str) -> List[Tuple[str, Any, Dict[str, Any]]]:
    """URL specs for a Jupyter server at ``base_url``: the signaling handlers, plus the status page."""
    if _JUPYTER_IMPORT_ERROR is not None:  # pragma: no cover
        raise ImportError("duet_jupyter needs jupyter_server>=2 to be mounted") from _JUPYTER_IMPORT_ERROR
    prefix = url_path_join(base_url, MOUNT)
    public = {SignalingWebSocket: JupyterSignalingWebSocket, HealthHandler: JupyterHealthHandler}
    handlers: List[Tuple[str, Any, Dict[str, Any]]] = []
    for pattern, handler, kwargs in make_handlers(state, prefix):
        if handler not in public:  # a handler we do not know about: refuse rather than expose it
            raise RuntimeError(f"duet_jupyter does not know how to mount {handler.__name__}")
        handlers.append((pattern, public[handler], kwargs))
    escaped = re.escape(prefix)
    handlers.append((escaped + r"/?", StatusPageHandler, {"state": state}))
    handlers.append((escaped + r"/status", StatusAPIHandler, {"state": state}))
    return handlers


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Called by jupyter_server: create the relay state and mount the handlers."""
    web_app = serverapp.web_app
    if web_app.settings.get(STATE_SETTING) is not None:  # loaded twice (e.g. listed in two configs)
        serverapp.log.debug("duet_jupyter: already loaded")
        return
    try:
        config = DuetSignaling(parent=serverapp)
        limits, ice = config.limits(), config.ice()
    except ValueError as exc:
        serverapp.log.error("duet_jupyter: invalid DuetSignaling configuration: %s", exc)
        raise
    state = SignalingState(limits, ice)
    base_url = web_app.settings.get("base_url", "/")
    web_app.add_handlers(".*$", make_jupyter_handlers(state, base_url))
    web_app.settings[STATE_SETTING] = state
    serverapp.log.info(
        "Duet signaling mounted at %s (max %d rooms, %d connections)",
        url_path_join(base_url, MOUNT) + "/",
        limits.max_rooms,
        limits.max_connections,
    )
