"""ICE servers, and what to say when ICE finds no route.

aioice (under aiortc) uses one STUN and one TURN server per peer connection: the first of each in
the list. A team's list usually names the same TURN server over UDP and over TCP, and only one of
them works behind a given firewall. So a peer tries them in turn: `server_choices` gives, in order
of preference (relay over UDP, then TCP, then TLS), the lists to gather with, and the peer moves on
to the next when the TURN server gave no relay candidate.

When ICE checks find no working pair, aioice itself gives up only after about a minute of STUN
retransmissions; Duet stops after `ICE_CHECK_TIMEOUT` and explains, from the candidates each side
announced, what was tried and what is missing (`no_route_message`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

# Seconds of ICE checks without a working pair before the link is declared failed. Checks between
# reachable candidates succeed within a few round trips (0.2-0.6 s measured in the NAT lab, and
# aioice retransmits after 0.5, 1, 2 and 4 s), so 10 s leaves room for loss and long paths.
ICE_CHECK_TIMEOUT = 10.0

CANDIDATE_NAMES = {"host": "host", "srflx": "server-reflexive", "prflx": "peer-reflexive", "relay": "relay"}
_CANDIDATE_TYPE = re.compile(r"^a=candidate:\S+ \d+ (\S+) \d+ \S+ \d+ typ (\w+)", re.MULTILINE)


@dataclass(frozen=True)
class IceServerUrl:
    """One URL of an ICE server entry, with its credentials and what aioice makes of it."""

    url: str
    username: Optional[str]
    credential: Optional[str]
    scheme: str  # stun, stuns, turn or turns
    transport: Optional[str]  # udp or tcp, for TURN

    @property
    def is_turn(self) -> bool:
        return self.scheme in ("turn", "turns")

    @property
    def relay_protocol(self) -> str:
        """How packets reach this TURN server: udp, tcp or tls."""
        return "tls" if self.scheme == "turns" else (self.transport or "udp")

    def server(self) -> RTCIceServer:
        return RTCIceServer(urls=self.url, username=self.username, credential=self.credential)


def expand_servers(servers: Iterable[Any]) -> List[IceServerUrl]:
    """Each URL of each entry (strings, {"urls", "username", "credential"} dicts, RTCIceServer) on its own.

    Raises TypeError or ValueError, naming the entry, for anything aiortc could not use.
    """
    out: List[IceServerUrl] = []
    for entry in servers:
        urls: Any
        if isinstance(entry, str):
            urls, username, credential = entry, None, None
        elif isinstance(entry, dict):
            urls, username, credential = entry.get("urls"), entry.get("username"), entry.get("credential")
        elif isinstance(entry, RTCIceServer):
            urls, username, credential = entry.urls, entry.username, entry.credential
        else:
            raise TypeError(f"an ICE server is a URL string or a dict, not {type(entry).__name__}")
        for url in [urls] if isinstance(urls, str) else list(urls or []):
            if not isinstance(url, str):
                raise TypeError(f"an ICE server URL is a string, not {type(url).__name__}")
            try:
                parsed = parse_stun_turn_uri(url)
            except ValueError as exc:
                raise ValueError(f"ICE server URL {url!r}: {exc}") from None
            out.append(IceServerUrl(url, username, credential, parsed["scheme"], parsed.get("transport")))
    return out


_RELAY_PREFERENCE = {"udp": 0, "tcp": 1, "tls": 2}


def server_choices(servers: Iterable[Any], with_stun: bool = True) -> List[List[IceServerUrl]]:
    """The server lists to gather with, best first: the first STUN URL with each TURN URL in turn.

    TURN over UDP first (lowest latency), then TCP, then TLS; within one protocol, the list's order.
    No TURN: one list with the STUN server alone (or an empty one).
    """
    urls = expand_servers(servers)
    stun = [u for u in urls if not u.is_turn and u.scheme == "stun"][:1] if with_stun else []
    turns = sorted((u for u in urls if u.is_turn and _aiortc_accepts(u)),
                   key=lambda u: _RELAY_PREFERENCE.get(u.relay_protocol, 3))
    if not turns:
        return [stun]
    return [stun + [t] for t in turns]


def _aiortc_accepts(url: IceServerUrl) -> bool:
    """aiortc skips TURN over anything but UDP/TCP and TLS over anything but TCP."""
    return (url.scheme == "turn" and url.transport in ("udp", "tcp")) or (url.scheme == "turns" and url.transport == "tcp")


def rtc_configuration(choice: List[IceServerUrl]) -> RTCConfiguration:
    """An explicit RTCConfiguration (never aiortc's default public STUN server)."""
    return RTCConfiguration(iceServers=[u.server() for u in choice])


@dataclass
class IceConfig:
    """Which ICE servers to use, and whether to stay on loopback.

    servers: STUN/TURN servers, as URL strings or dicts
        {"urls": ..., "username": ..., "credential": ...}. None by default:
        nothing outside the two peers is contacted (aiortc would otherwise
        use a public STUN server and block up to 5 s when offline).
    local_only: every local candidate is 127.0.0.1 and every remote
        candidate that is not 127.0.0.1 is dropped. For tests and for two
        peers on one machine; no packet leaves the loopback interface.
    """

    servers: list = field(default_factory=list)
    local_only: bool = False

    def __post_init__(self) -> None:
        expand_servers(self.servers)  # a bad entry fails here, before any peer exists

    def rtc_configuration(self) -> RTCConfiguration:
        """The first (preferred) choice of servers; see `server_choices` for the rest."""
        return rtc_configuration(server_choices(self.servers)[0])

    def choices(self, with_stun: bool = True) -> List[List[IceServerUrl]]:
        return server_choices(self.servers, with_stun)


# -- diagnosis -------------------------------------------------------------------------------------


def candidate_types(sdp: Optional[str]) -> Dict[str, set]:
    """Candidate types an SDP announces, with the transports of each: {"host": {"udp"}, ...}."""
    found: Dict[str, set] = {}
    for transport, kind in _CANDIDATE_TYPE.findall(sdp or ""):
        found.setdefault(kind, set()).add(transport.lower())
    return found


def _describe(types: Dict[str, set]) -> str:
    if not types:
        return "no candidates at all"
    names = [CANDIDATE_NAMES.get(t, t) for t in ("host", "srflx", "prflx", "relay") if t in types]
    names += [t for t in sorted(types) if t not in CANDIDATE_NAMES]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text + (" candidate" if len(names) == 1 else " candidates")


def no_route_message(local_sdp: Optional[str], remote_sdp: Optional[str], servers: List[IceServerUrl],
                     peer: str, waited: float) -> str:
    """Why no route was found and what to do, from what each side announced.

    peer: how to name the other side ("the owner", "the scientist").
    """
    mine, theirs = candidate_types(local_sdp), candidate_types(remote_sdp)
    had_stun = any(not u.is_turn for u in servers)
    turn = [u for u in servers if u.is_turn]
    head = (f"no network route to {peer} after {waited:g} s of ICE checks: your side gathered {_describe(mine)}, "
            f"{peer}'s side {_describe(theirs)}")
    if "relay" in mine or "relay" in theirs:
        return (head + "; a TURN relay was offered but no check through it succeeded: a firewall may block "
                "the TURN server's relay ports, or the two sides use different TURN servers (see docs/networks.md)")
    if turn:
        tried = ", ".join(u.url for u in turn)
        return (head + f"; the TURN server ({tried}) gave you no relay address: check that it is reachable from "
                "here and that its credentials are current (the signaling service makes them from coturn's "
                "static-auth-secret; see docs/networks.md)")
    if not had_stun and "srflx" not in mine:
        return (head + "; no STUN or TURN server is configured, so only computers on one network can connect. "
                "Between two networks a TURN server is needed: have the signaling service offer one "
                "(--turn-url/--turn-secret) or pass ice_servers=[...] (see docs/networks.md)")
    return (head + "; no direct route and no relay: at least one side is behind a NAT that hole punching cannot "
            "cross (a symmetric NAT or a firewall), so a TURN server is needed: have the signaling service offer "
            "one (--turn-url/--turn-secret) or pass ice_servers=[...] (see docs/networks.md)")


def relay_gathered(sdp: Optional[str]) -> bool:
    return "relay" in candidate_types(sdp)


def srflx_gathered(sdp: Optional[str]) -> bool:
    return "srflx" in candidate_types(sdp)

