"""Which path a WebRTC link took: direct or through a TURN relay, candidate types, protocol.

Read from the ICE pair aioice nominated (aiortc exposes no public accessor for it), so a user can
see whether a relay carries the traffic, and a slow link can be explained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Route:
    """The selected candidate pair of a link, or how the link is made when it is not WebRTC."""

    kind: str  # "direct", "relay" (a TURN server carries it) or "in-process"
    local_type: Optional[str] = None  # host, srflx, prflx or relay
    remote_type: Optional[str] = None
    protocol: Optional[str] = None  # udp, tcp or tls: how our packets travel (to the TURN server, when relayed)
    rtt: Optional[float] = None  # seconds, measured by a ping when asked
    fast_path: Optional[str] = None  # the direct TCP path for large messages: up (to where), connecting, down (why), off

    def __str__(self) -> str:
        if self.kind == "in-process":
            return "in-process (no network)"
        parts = [f"{self.kind} over {self.protocol or '?'}", f"{self.local_type or '?'} -> {self.remote_type or '?'} candidates"]
        if self.rtt is not None:
            parts.append(f"rtt {self.rtt * 1000:.1f} ms")
        if self.fast_path is not None:
            parts.append(f"fast path {self.fast_path}")
        return ", ".join(parts)

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(str(self))}</code>"


def selected_route(pc: Any) -> Optional[Route]:
    """The nominated pair of a peer connection's ICE transport; None before one is nominated."""
    try:
        ice = pc.sctp.transport.transport  # RTCSctpTransport -> RTCDtlsTransport -> RTCIceTransport
        connection = ice._connection
        pair = connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    relayed = "relay" in (local.type, remote.type)
    protocol = str(local.transport).lower()
    if local.type == "relay":
        # A relay candidate is UDP at the TURN server; what crosses our network is the way to it.
        protocol = "tls" if getattr(connection, "turn_ssl", False) else str(getattr(connection, "turn_transport", protocol)).lower()
    return Route(kind="relay" if relayed else "direct", local_type=local.type, remote_type=remote.type,
                 protocol=protocol)
