"""ICE servers a signaling service hands its peers, with TURN credentials made per registration.

A team configures STUN/TURN once, on the service, instead of every user passing the same list on
both sides. TURN credentials follow the TURN REST scheme coturn implements (`use-auth-secret` and
`static-auth-secret`): username ``<expiry>:<label>``, password ``base64(HMAC-SHA1(secret,
username))``. The long-lived secret never leaves the service; what a peer receives stops working
at the expiry. HMAC comes from Python's standard library.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

DEFAULT_TTL_SECONDS = 24 * 3600.0  # the owner's credentials are made once, when it registers
SCHEMES = ("stun:", "turn:", "turns:")


def turn_credential(secret: str, username: str) -> str:
    """The TURN REST password for a username: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_url(url: str) -> str:
    """A STUN/TURN URL as aiortc accepts it (stun:, turn: or turns:, host, optional port and transport)."""
    if not isinstance(url, str) or not url.startswith(SCHEMES) or len(url) > 256 or any(c.isspace() for c in url):
        raise ValueError(f"not a STUN/TURN URL: {url!r} (expected stun:host[:port] or turn:host[:port][?transport=tcp])")
    return url


@dataclass(frozen=True)
class IceOffer:
    """What the service tells each peer about ICE servers (nothing, by default)."""

    stun_urls: List[str] = field(default_factory=list)
    turn_urls: List[str] = field(default_factory=list)
    turn_secret: Optional[str] = None
    ttl_seconds: float = DEFAULT_TTL_SECONDS

    def __post_init__(self) -> None:
        for url in self.stun_urls:
            if not check_url(url).startswith("stun:"):
                raise ValueError(f"--ice-server takes stun: URLs; give TURN servers with --turn-url: {url!r}")
        for url in self.turn_urls:
            if not check_url(url).startswith(("turn:", "turns:")):
                raise ValueError(f"--turn-url takes turn: or turns: URLs: {url!r}")
        if self.turn_urls and not self.turn_secret:
            raise ValueError("--turn-url needs --turn-secret (coturn's static-auth-secret)")
        if not self.ttl_seconds > 0:
            raise ValueError("the TURN credential lifetime must be positive")

    @property
    def empty(self) -> bool:
        return not self.stun_urls and not self.turn_urls

    def servers_for(self, label: str, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """The list for one registration: STUN as is, TURN with a credential that expires."""
        servers: List[Dict[str, Any]] = [{"urls": url} for url in self.stun_urls]
        if self.turn_urls and self.turn_secret:
            expiry = int((time.time() if now is None else now) + self.ttl_seconds)
            username = f"{expiry}:{label}"
            credential = turn_credential(self.turn_secret, username)
            servers.extend({"urls": url, "username": username, "credential": credential} for url in self.turn_urls)
        return servers
