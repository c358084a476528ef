"""The public entry points: `local_pair`, `launch`, `join`."""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional, Tuple

from . import identity as identity_mod
from .identity import HandshakeContext
from .owner.host import Owner
from .owner.objects import Limits
from .scientist.client import Scientist
from .session import Session
from .transport.memory import memory_pair

DEFAULT_JOIN_TIMEOUT = 30.0


def local_pair(
    approve: str = "auto",
    owner_name: str = "owner",
    scientist_name: str = "scientist",
    audit_log: Optional[Path | str] = None,
    limits: Optional[Limits] = None,
    approve_joins: bool = False,
    timeout: float = DEFAULT_JOIN_TIMEOUT,
) -> Tuple[Owner, Scientist]:
    """An owner and a scientist in this process, over the in-memory transport.

    For trying Duet out and for tests: everything but the network is real,
    including the signed identity handshake (with fresh in-memory identities).
    """
    owner = Owner(
        name=owner_name,
        approve=approve,
        approve_joins=approve_joins,
        audit_log=audit_log if audit_log is not None else _temp_audit_path(),
        limits=limits,
        identity=identity_mod.Identity.ephemeral(),
    )
    owner_end, scientist_end = memory_pair()
    ctx = HandshakeContext(
        room_id=secrets.token_hex(16),
        session_id=secrets.token_bytes(16),
        owner_dtls=_random_fingerprint(),
        scientist_dtls=_random_fingerprint(),
        owner_name=owner_name,
        scientist_name=scientist_name,
    )
    owner.attach(Session(owner_end, name="owner"), ctx)
    scientist = Scientist(Session(scientist_end, name="scientist", bin_views=True), name=scientist_name, identity=identity_mod.Identity.ephemeral())
    scientist.handshake(ctx, timeout)
    return owner, scientist


def _random_fingerprint() -> str:
    """Stands in for a DTLS fingerprint where there is no DTLS (the in-memory link)."""
    return "sha-256 " + ":".join(f"{b:02X}" for b in secrets.token_bytes(32))


def _temp_audit_path() -> Path:
    """Local pairs log to a fresh temporary file, so experiments do not fill the real audit log."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="duet-local-"))
    return folder / "audit.jsonl"
