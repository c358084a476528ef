"""Public exception types. Every error a user can meet is one of these."""
from __future__ import annotations


class DuetError(Exception):
    """Base class of every Duet error."""


class ProtocolError(DuetError):
    """Bytes or a message that do not follow the wire schema, or exceed its limits."""


class NotAllowed(DuetError):
    """The operation is not on the owner's allowlist, or breaks a rule."""


class NotAllowedHere(NotAllowed, AttributeError):
    """A name refused at the call site: the receiver's kind is known and the name is not on its list.

    Also an AttributeError, so `hasattr` and notebook completion treat it as a missing attribute.
    """


class RemoteError(DuetError):
    """An operation failed on the owner. Names the operation and exception type, never values."""

    def __init__(self, op: str, exc_type: str, detail: str = "") -> None:
        self.op = op
        self.exc_type = exc_type
        self.detail = detail
        msg = f"{op} failed on the owner with {exc_type}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class UnknownObject(NotAllowed):
    """An action named a remote object that does not exist (freed, failed, or never created)."""


class LimitExceeded(DuetError):
    """A per-scientist limit (objects, bytes, queued actions) would be exceeded."""


class BudgetExceeded(NotAllowed):
    """A differentially private release would spend more privacy budget than is left.

    Raised before anything is computed or charged; the normal approval path still exists.
    """


class RequestDenied(DuetError):
    """The owner denied a request. Carries the owner's reason."""

    def __init__(self, reason: str = "", request_id: int | None = None) -> None:
        self.reason = reason
        self.request_id = request_id
        msg = "the owner denied the request"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)


class RequestTimeout(DuetError, TimeoutError):
    """No answer or decision in time (also a TimeoutError).

    A release request stays pending and can be waited on again.
    """


class ConnectionLost(DuetError, ConnectionError):
    """The link to the peer closed; pending calls fail with this."""


class PairingError(DuetError):
    """A join code that is malformed, mistyped, expired, or a pairing that failed verification."""


class ConnectionFailed(PairingError):
    """Pairing worked but no network path between the peers did: ICE found no route.

    Raised from the ICE state well before the join timeout, with what each side gathered and what
    to configure (usually a TURN server); see docs/networks.md.
    """


class SignalingError(DuetError, ConnectionError):
    """The signaling service refused, closed, or could not be reached."""
