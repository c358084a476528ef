"""Peer-to-peer pairing: `launch` for the owner, `join` for the scientist.

The scientist offers, the owner answers. Every signaling payload is sealed
with a key derived from the join code's secret (duet.pairing), so the
signaling service relays bytes it can neither read nor alter. After the
WebRTC channel opens, both sides sign a transcript binding their identity
keys to this session's DTLS fingerprints (duet.identity.HandshakeContext).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Set, Tuple

from . import runtime
from .errors import ConnectionFailed, PairingError, RequestTimeout, SignalingError
from .identity import HandshakeContext
from .owner.host import Owner
from .pairing import JoinCode, Sealer, new_session_id, peek_session
from .scientist.client import Scientist
from .session import Session
from .signaling_client import SignalingClient
from .text import clean
from .transport.ice import IceConfig
from .transport.fastpath import FastPathTransport, fast_path_enabled
from .transport.webrtc import RtcPeer

log = logging.getLogger("duet.connect")

MAX_NAME = 100
PLAIN_ERROR_PREFIX = "!"  # unsealed notices: they can only make a pairing fail, never succeed
CHANNEL_OPEN_TIMEOUT = 20.0
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # then every 5 s
RECONNECT_FOR = 600.0  # give up re-registering after this long


def env_local_only(explicit: Optional[bool]) -> bool:
    """`local_only=` wins; otherwise DUET_LOCAL_ONLY=1 turns it on."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get("DUET_LOCAL_ONLY", "").strip().lower() in ("1", "true", "yes", "on")


def ice_config(local_only: Optional[bool], ice_servers: Optional[List[Any]],
               offered: Optional[List[Any]] = None) -> IceConfig:
    """Which STUN/TURN servers to use: `ice_servers=`, else $DUET_ICE_SERVERS (JSON), else the service's offer.

    Nothing is contacted unless one of them names a server; with local_only, the service's offer is
    ignored (no packet leaves the loopback interface).
    """
    is_local = env_local_only(local_only)
    if ice_servers is not None:
        servers = list(ice_servers)
    elif os.environ.get("DUET_ICE_SERVERS", "").strip():
        servers = _env_ice_servers(os.environ["DUET_ICE_SERVERS"])
    else:
        servers = [] if is_local else _usable_offer(offered or [])
    return IceConfig(servers=servers, local_only=is_local)


def _usable_offer(offered: List[Any]) -> List[Any]:
    """The entries of the (untrusted) service's offer that aiortc can use; the others are dropped with a warning."""
    from .transport.ice import expand_servers

    usable = []
    for entry in offered:
        try:
            expand_servers([entry])
        except (TypeError, ValueError) as exc:
            log.warning("ignored an ICE server the signaling service offered: %s", exc)
            continue
        usable.append(entry)
    return usable


def _env_ice_servers(text: str) -> List[Any]:
    """$DUET_ICE_SERVERS: a JSON list of URLs or {"urls", "username", "credential"} objects."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"$DUET_ICE_SERVERS is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
        raise ValueError('$DUET_ICE_SERVERS must be a JSON list such as ["stun:stun.example.org:3478"]')
    return value


def _clean_name(name: Any) -> str:
    return clean(name, limit=MAX_NAME).strip() or "unnamed"


@dataclass
class OwnerSignaling:
    """The owner's side of signaling: answers each new scientist's sealed offer."""

    owner: Owner
    code: JoinCode
    client: SignalingClient
    ice: IceConfig
    embedded: Any = None  # a RunningService when launch() started one
    seen_sessions: Set[bytes] = field(default_factory=set)
    peers: List[RtcPeer] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    close_reason: str = ""
    task: Optional["asyncio.Task[None]"] = None
    registrations: int = 0
    local_only: bool = False  # (the fast path listens on 127.0.0.1 only, too)
    fast_path: bool = True
    _registration: threading.Condition = field(default_factory=threading.Condition)

    async def serve(self) -> None:
        """Relay offers to answers; if the service goes away, register again when it is back."""
        try:
            while True:
                try:
                    await self._relay_events()
                    return  # the service closed the room (expired): a new code is needed
                except SignalingError as exc:
                    if self.owner.closed:
                        return
                    self.close_reason = str(exc)
                    log.warning("signaling connection lost (%s); connected scientists stay connected, reconnecting", exc)
                    if not await self._reconnect():
                        return
        except asyncio.CancelledError:
            self.close_reason = "closed"
            raise
        finally:
            self.closed.set()

    async def _relay_events(self) -> None:
        while True:
            event = await self.client.recv()
            if event.kind == "msg" and event.peer and event.data:
                asyncio.ensure_future(self._on_offer(event.peer, event.data))
            elif event.kind == "room_closed":
                self.close_reason = event.message or event.code or "the room closed"
                if event.code == "expired":
                    log.warning("signaling room expired; connected scientists stay connected")
                    return
                raise SignalingError(f"the signaling service closed the room: {self.close_reason}")

    async def _reconnect(self) -> bool:
        """Register the same room again, with backoff, for at most RECONNECT_FOR seconds."""
        deadline = time.monotonic() + RECONNECT_FOR
        attempt = 0
        while not self.owner.closed and time.monotonic() < deadline:
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            attempt += 1
            try:
                self.client = await SignalingClient.connect(self.code.signaling_url, self.code.room_id, "owner", timeout=5)
            except SignalingError:
                continue
            self.close_reason = ""
            self._registered()
            log.info("registered with the signaling service again")
            return True
        self.close_reason = f"the signaling service stayed unreachable for {RECONNECT_FOR:g} s; launch again for a new code"
        log.warning(self.close_reason)
        return False

    def _registered(self) -> None:
        with self._registration:
            self.registrations += 1
            self._registration.notify_all()

    def wait_registration(self, count: int, timeout: float) -> None:
        """Block until the owner has registered with the service `count` times (1 = the first)."""
        with self._registration:
            if not self._registration.wait_for(lambda: self.registrations >= count, timeout):
                raise TimeoutError(f"not registered with the signaling service within {timeout} s")

    async def _on_offer(self, peer_id: str, data: str) -> None:
        try:
            sid = peek_session(self.code, data, "scientist")
            if sid in self.seen_sessions:
                raise PairingError("a replayed offer (this session id was already used)")
            sealer = Sealer(self.code, "owner", sid)
            kind, body = sealer.open(data)
            if kind != "offer" or not isinstance(body.get("sdp"), str):
                raise PairingError("the first message must be an offer")
            self.seen_sessions.add(sid)
        except PairingError as exc:
            log.warning("refused a signaling message: %s", exc)
            await self._notify(peer_id, f"the owner could not verify your pairing message ({exc})")
            return
        scientist_name = _clean_name(body.get("name"))
        peer = await RtcPeer.create(self.ice)
        self.peers.append(peer)
        try:
            answer = await peer.accept_offer(body["sdp"])
            await self.client.send(sealer.seal("answer", {"sdp": answer, "name": self.owner.name}), to=peer_id)
            transport = await peer.wait_open(CHANNEL_OPEN_TIMEOUT, peer="the scientist")
        except ConnectionFailed as exc:
            log.warning("connection to scientist %r failed: %s", scientist_name, exc)
            self.owner.record_connection_failure(scientist_name, str(exc))
            await peer.close()
            self.peers.remove(peer)
            return
        except Exception as exc:
            log.warning("pairing with %r failed: %s", scientist_name, exc)
            await peer.close()
            self.peers.remove(peer)
            return
        ctx = HandshakeContext(
            room_id=self.code.room_id,
            session_id=sid,
            owner_dtls=peer.local_fingerprint,
            scientist_dtls=peer.remote_fingerprint,
            owner_name=self.owner.name,
            scientist_name=scientist_name,
        )
        wrapped = FastPathTransport(transport, "owner", local_only=self.local_only, enabled=self.fast_path)
        session = Session(wrapped, name=f"owner<->{scientist_name}")

        def forget(_reason: Optional[BaseException]) -> None:
            runtime.submit(_forget_peer(self, peer))

        session.on_close(forget)
        self.owner.attach(session, ctx)

    async def _notify(self, peer_id: str, text: str) -> None:
        try:
            await self.client.send(PLAIN_ERROR_PREFIX + text[:500], to=peer_id)
        except SignalingError:
            pass

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.client.close()
        for peer in list(self.peers):
            await peer.close()
        if self.embedded is not None:
            await self.embedded.stop()


async def _forget_peer(sig: OwnerSignaling, peer: RtcPeer) -> None:
    if peer in sig.peers:
        sig.peers.remove(peer)
    await peer.close()


def _advertised_host(bind_host: str, local_only: bool, addresses: Optional[List[str]] = None) -> Tuple[str, Optional[str]]:
    """The address the join code names for an embedded service, and a warning for the owner if any.

    Never a host name (socket.getfqdn() usually resolves only on this computer): an address of one
    of this computer's interfaces, public before private; a private one works only on this network.
    `addresses`: the interfaces' IPv4 addresses (read from the system when None).
    """
    if local_only or bind_host in ("127.0.0.1", "localhost"):
        return "127.0.0.1", None
    if bind_host not in ("0.0.0.0", "::", ""):
        chosen = bind_host
    else:
        if addresses is None:
            import aioice.ice

            addresses = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
        usable = [a for a in addresses if not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local]
        public = [a for a in usable if ipaddress.ip_address(a).is_global]
        if not usable:
            return "127.0.0.1", ("this computer has no network address besides 127.0.0.1: the join code works only "
                                 "here (see docs/networks.md)")
        chosen = (public or usable)[0]
    try:
        address = ipaddress.ip_address(chosen)
    except ValueError:
        return chosen, None  # a name the owner chose on purpose
    if address.is_global:
        return chosen, None
    return chosen, (f"the join code points to {chosen}, a private address: only computers on the same network "
                    "can join. Between two networks, use a signaling service both sides can reach "
                    "(signaling=URL or $DUET_SIGNALING_URL; see docs/networks.md)")


def _url_host(host: str) -> str:
    """IPv6 literals go in brackets in a URL."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def embedded_limits() -> Any:
    """Limits for a service inside the owner's process: far below its file limit, so that
    connections others open can never make the owner's own files (audit log, data) fail."""
    import resource

    from duet_signaling.service import Limits as ServiceLimits

    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):  # pragma: no cover - platforms without rlimits
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 65536
    connections = max(8, min(256, soft // 8))
    return ServiceLimits(max_connections=connections, max_rooms=max(2, min(64, connections // 2)))


async def _start_embedded(host: str, port: int) -> Any:
    import duet_signaling

    return await duet_signaling.start(host=host, port=port, limits=embedded_limits())


def launch(
    name: str = "owner",
    signaling: Optional[str] = None,
    local_only: Optional[bool] = None,
    approve: str = "auto",
    approve_joins: bool = False,
    ice_servers: Optional[List[Any]] = None,
    host: Optional[str] = None,
    port: int = 0,
    audit_log: Optional[str] = None,
    limits: Any = None,
    request_expiry: Optional[float] = 24 * 3600,
    resume_window: float = 600.0,
    display: bool = True,
    timeout: float = 15.0,
    fast_path: Optional[bool] = None,
) -> Owner:
    """Start serving as a data owner and print the join code for the scientist.

    signaling: the signaling service URL (default: $DUET_SIGNALING_URL, else an
    embedded service in this process); "jupyter" uses the /duet endpoint of the
    Jupyter server running this kernel. fast_path: offer each scientist a direct TCP
    connection for large transfers (default on; DUET_FAST_PATH=0 turns it off).
    """
    is_local = env_local_only(local_only)
    url = signaling or os.environ.get("DUET_SIGNALING_URL") or None
    if url == "jupyter":
        from duet_jupyter.discovery import find_jupyter_signaling_url

        url = find_jupyter_signaling_url()
    owner = Owner(
        name=_clean_name(name),
        approve=approve,
        approve_joins=approve_joins,
        audit_log=audit_log,
        limits=limits,
        request_expiry=request_expiry,
        resume_window=resume_window,
    )

    warnings_found: List[str] = []

    async def start() -> OwnerSignaling:
        embedded = None
        base = url
        if base is None:
            # Loopback unless asked: an embedded service on every interface would let anyone on the
            # network open rooms in the owner's process. host="0.0.0.0" (or a LAN address) serves others.
            bind = host or "127.0.0.1"
            embedded = await _start_embedded(bind, port)
            advertised, warning = _advertised_host(bind, is_local)
            if warning:
                warnings_found.append(warning)
            base = f"http://{_url_host(advertised)}:{embedded.port}"
        code = JoinCode.new(base, owner_key=owner.identity.public_key)  # the scientist checks who answers
        try:
            client = await SignalingClient.connect(base, code.room_id, "owner", timeout=timeout)
        except BaseException:
            if embedded is not None:
                await embedded.stop()
            raise
        ice = ice_config(local_only, ice_servers, offered=client.ice_servers)
        sig = OwnerSignaling(owner=owner, code=code, client=client, ice=ice, embedded=embedded, local_only=is_local,
                             fast_path=fast_path_enabled(fast_path))
        sig._registered()
        sig.task = asyncio.ensure_future(sig.serve())
        return sig

    try:
        sig = runtime.run(start(), timeout=timeout + 5, what="starting the Duet owner")
    except BaseException:
        owner.close()
        raise
    for text in warnings_found:
        log.warning("%s", text)
        warnings.warn(text, stacklevel=2)
    owner.code = str(sig.code)
    owner.signaling = sig  # type: ignore[attr-defined]
    owner._closers.append(lambda: runtime.run(sig.close(), timeout=10, what="closing signaling"))
    if display:
        _announce(owner)
    return owner


def _announce(owner: Owner) -> None:
    """Show the join code: as a panel in Jupyter, as text elsewhere."""
    try:
        from .widgets import display_owner

        if display_owner(owner):
            return
    except ImportError:
        pass
    print(f"Duet owner {owner.name!r} is ready. The scientist runs:\n\n    duet.join({owner.code!r})\n", flush=True)


async def _offer_and_connect(parsed: JoinCode, name: str, ice: Optional[IceConfig], timeout: float,
                             local_only: Optional[bool] = None) -> tuple:
    """The scientist's half of pairing: sealed offer, sealed answer, open channel.

    `ice` None: use what the service offers at registration (ice_config's precedence).
    """
    client = await SignalingClient.connect(parsed.signaling_url, parsed.room_id, "scientist", timeout=timeout)
    if ice is None:
        ice = ice_config(local_only, None, offered=client.ice_servers)
    peer = await RtcPeer.create(ice)
    try:
        sid = new_session_id()
        sealer = Sealer(parsed, "scientist", sid)
        offer = await peer.create_offer()
        await client.send(sealer.seal("offer", {"sdp": offer, "name": name}))
        while True:
            event = await client.recv()
            if event.kind == "room_closed":
                raise SignalingError(f"the owner's room closed: {event.message or event.code}")
            if event.kind != "msg" or not event.data:
                continue
            if event.data.startswith(PLAIN_ERROR_PREFIX):
                raise PairingError(event.data[1:] + " — the signaling service may have tampered with it")
            kind, body = sealer.open(event.data)
            if kind != "answer" or not isinstance(body.get("sdp"), str):
                raise PairingError("the owner's reply is not an answer")
            owner_name = _clean_name(body.get("name"))
            await peer.accept_answer(body["sdp"])
            transport = await peer.wait_open(CHANNEL_OPEN_TIMEOUT, peer="the owner")
            ctx = HandshakeContext(
                room_id=parsed.room_id,
                session_id=sid,
                owner_dtls=peer.remote_fingerprint,
                scientist_dtls=peer.local_fingerprint,
                owner_name=owner_name,
                scientist_name=name,
            )
            return peer, transport, ctx
    except BaseException:
        await peer.close()
        raise
    finally:
        await client.close()


def join(
    code: str,
    name: str = "scientist",
    local_only: Optional[bool] = None,
    ice_servers: Optional[List[Any]] = None,
    timeout: float = 30.0,
    join_approval_timeout: float = 300.0,
    reason: str = "",
    fast_path: Optional[bool] = None,
) -> Scientist:
    """Join an owner's Duet with the code they shared; returns the scientist's handle.

    Fails with a clear error, never a hang: PairingError for a mistyped code,
    SignalingError when the service or room cannot be reached, ConnectionFailed
    (a PairingError) when the owner answered but no network route exists (in about
    10 s, saying what to configure), TimeoutError when the owner does not answer
    within `timeout` seconds. fast_path: after joining, try a direct TCP connection for
    large transfers (default on; DUET_FAST_PATH=0 turns it off; `scientist.connection` says
    whether it is up); everything works without it.
    """
    parsed = JoinCode.parse(code)
    use_fast_path = fast_path_enabled(fast_path)
    name = _clean_name(name)
    # Explicit servers (argument or $DUET_ICE_SERVERS) win; otherwise the service's offer, read at registration.
    explicit = ice_servers is not None or bool(os.environ.get("DUET_ICE_SERVERS", "").strip())
    ice = ice_config(local_only, ice_servers) if explicit else None

    def pair(seconds: float) -> tuple:
        """Pair over signaling; returns (session, handshake context, closer of the peer connection)."""
        try:
            peer, transport, ctx = runtime.run(
                _offer_and_connect(parsed, name, ice, seconds, local_only), timeout=seconds, what="joining the owner's Duet"
            )
        except TimeoutError:
            raise RequestTimeout(
                f"the owner did not answer within {seconds} s; check that their Duet is still running and the code is current"
            ) from None
        wrapped = FastPathTransport(transport, "scientist", local_only=env_local_only(local_only), enabled=use_fast_path)
        session = Session(wrapped, name=f"scientist<->{ctx.owner_name}", bin_views=True)  # release payloads: views
        return session, ctx, lambda: runtime.run(peer.close(), timeout=10, what="closing the peer connection")

    session, ctx, closer = pair(timeout)
    scientist = Scientist(session, name=name)
    scientist._closers.append(closer)
    scientist._rejoin = pair
    try:
        scientist.handshake(ctx, join_approval_timeout, reason=reason, code=parsed)
    except BaseException:
        scientist.close()
        raise
    return scientist
