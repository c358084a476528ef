"""Reading session descriptions: candidate addresses, the loopback-only filter, DTLS fingerprints.

Plain text processing of SDP strings (no aiortc objects), so it can be tested without a peer
connection. What the candidate types tell about a failed link is in `duet.transport.ice`.
"""
from __future__ import annotations

import re
from typing import List

from ..errors import ConnectionLost, ProtocolError

LOOPBACK = "127.0.0.1"

_CANDIDATE_RE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ ", re.IGNORECASE)


def candidate_addresses(sdp: str) -> List[str]:
    """The connection address of every `a=candidate` line of an SDP."""
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            m = _CANDIDATE_RE.match(line)
            out.append(m.group(1) if m else "?")
    return out


def keep_loopback_candidates(sdp: str) -> str:
    """Drop every remote candidate that is not 127.0.0.1 (loopback-only mode).

    Without this aioice would also probe the peer's other addresses (and
    resolve mDNS names with multicast), sending packets off loopback.
    Raises ConnectionLost if no loopback candidate is left.
    """
    lines = sdp.splitlines()
    kept = []
    n_loop = 0
    for line in lines:
        if line.startswith("a=candidate:"):
            m = _CANDIDATE_RE.match(line)
            if not m or m.group(1) != LOOPBACK:
                continue
            n_loop += 1
        kept.append(line)
    if n_loop == 0:
        raise ConnectionLost(
            "loopback-only ICE: the remote description offers no 127.0.0.1 candidate "
            "(is the peer also in local_only mode, on this machine?)")
    return "\r\n".join(kept) + "\r\n"


def fingerprint_of(sdp: str, algorithm: str = "sha-256") -> str:
    """The DTLS certificate fingerprint an SDP announces (upper-case hex with colons)."""
    for line in sdp.splitlines():
        if line.startswith("a=fingerprint:"):
            alg, _, value = line[len("a=fingerprint:"):].strip().partition(" ")
            if alg.lower() == algorithm:
                return value.strip().upper()
    raise ProtocolError(f"the session description has no {algorithm} DTLS fingerprint")
