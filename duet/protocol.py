"""The message vocabulary between a scientist and an owner, in one place.

Every message is a msgpack map with a type under "t" (`Msg`). Round trips are a `Msg.REQ` with an
"id" and a `RequestKind` under "kind", answered by a `Msg.REP` with the same id. Actions (`Msg.CALL`)
say how to apply a name (`ActionKind`). Requests in the owner's permission queue have a `Status`.

The names are plain strings (the wire encoder refuses str subclasses, so no Enum values travel);
`FIELDS` says, per message type, which fields it may carry and of which types, and `problem()`
checks a message against it, so a handler can trust a field's type before it reads it. Adding a
message means adding it here, to `FIELDS`, and to the dispatch table of the side that receives it.

How errors travel (`error_to_wire`, `error_from_wire`) is also part of the protocol: our own error
types keep their messages (which we wrote); anything else is reduced to its type name.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

from .ciphertext import Ciphertext
from .errors import (
    BudgetExceeded,
    ConnectionLost,
    DuetError,
    LimitExceeded,
    NotAllowed,
    ProtocolError,
    RemoteError,
    RequestDenied,
    RequestTimeout,
    UnknownObject,
)


class Msg:
    """Message types (the "t" field)."""

    # session layer
    REQ = "req"  # a round trip: {"id", "kind", ...}
    REP = "rep"  # its answer: {"id", "ok", "value" | "error"}
    INVALID = "$invalid"  # never sent: what a session hands its handler for an undecodable message
    # handshake
    HELLO = "hello"  # scientist -> owner: identity key, signature over the transcript, join reason, resume token
    WELCOME = "welcome"  # owner -> scientist: identity key, signature, approval mode, resume token
    REJECTED = "rejected"  # owner -> scientist: the join was declined (with a reason)
    BYE = "bye"  # either way: an orderly close with a reason
    LEAVE = "leave"  # scientist -> owner: closing for good, nothing to resume
    # actions and objects (scientist -> owner, no reply)
    CALL = "call"  # run an allowlisted function, method, attribute or model call
    PUT = "put"  # upload the scientist's own value
    FREE = "free"  # forget objects
    REASON = "reason"  # a new reason for a release still waiting
    # training (scientist -> owner, no reply)
    MODEL = "model"  # a model as data (duet.owner.models)
    PLAN_DEF = "plan_def"
    PLAN_RUN = "plan_run"
    EPOCH = "epoch"  # start a new epoch of a remote loader
    BATCH = "batch"  # the next batch of a remote loader
    # owner -> scientist notices
    FAILED = "failed"  # an action without a reply failed: its result id and the error
    QUEUED = "queued"  # a release waits in the owner's queue: the request id there
    PROGRESS = "progress"  # a long request (DP training) is this far: steps done of total


class RequestKind:
    """What a `Msg.REQ` asks (its "kind")."""

    STORE = "store"  # the published assets
    ASSET = "asset"  # point an object id at an asset
    META = "meta"  # an object's metadata, when public
    RELEASE = "release"  # an object's value: at once if public, else through the permission queue
    LOADER = "loader"  # open a remote loader over a dataset
    PING = "ping"  # a round trip: everything sent before it was handled
    PRIVACY = "privacy"  # the scientist's own privacy budget and releases
    DP_TRAIN = "dp_train"  # train a copy of a model with DP-SGD on a dataset; the result is a DP release
    SECURE_SUM = "secure_sum"  # one step of a secure sum across owners (duet.secagg), under "step"
    HE_CONTEXT = "he_context"  # the scientist's public CKKS context ("context": a Ciphertext), for encrypted data
    SMPC = "smpc"  # one step of a secret-shared computation across owners (duet.sharing), under "step"


class ActionKind:
    """How a `Msg.CALL` applies its name."""

    FUNC = "func"  # an allowlisted function: torch.add
    METHOD = "method"  # a method of the first argument: x.sum()
    ATTR = "attr"  # an attribute of the first argument: x.T
    CALL = "call"  # call a model (or one of its sent methods)


class Status:
    """A queued request's life: pending, then exactly one of the others."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DECIDED = (ACCEPTED, DENIED, EXPIRED, CANCELLED)
    FAILED = "failed"  # the scientist's view only: the request could not be made or answered


MESSAGE_TYPES = frozenset(v for k, v in vars(Msg).items() if k.isupper())
REQUEST_KINDS = frozenset(v for k, v in vars(RequestKind).items() if k.isupper())
ACTION_KINDS = frozenset(v for k, v in vars(ActionKind).items() if k.isupper())

_Types = Union[Type[Any], Tuple[Type[Any], ...]]
_INT = (int,)  # bool is refused separately: True is not an object id
_ID_LIST = (list,)

# Per message type: field -> accepted types. A field may be absent (handlers say what they need);
# when present and not None it must have one of these types. "free" (ids freed on the way) may ride
# on any scientist message.
FIELDS: Mapping[str, Mapping[str, _Types]] = {
    Msg.REQ: {"id": _INT, "kind": str, "obj": _INT, "name": str, "rid": _INT, "reason": str, "dp": (int, float), "step": str,
              "context": Ciphertext},
    Msg.REP: {"id": _INT, "ok": bool, "error": dict},
    Msg.HELLO: {"pub": bytes, "sig": bytes, "reason": str, "resume": bytes},
    Msg.WELCOME: {"pub": bytes, "sig": bytes, "approve": str, "resume": bytes, "resumed": bool},
    Msg.REJECTED: {"reason": str},
    Msg.BYE: {"reason": str},
    Msg.LEAVE: {},
    Msg.CALL: {"rid": _INT, "kind": str, "name": str, "args": list, "kwargs": dict},
    Msg.PUT: {"rid": _INT},
    Msg.FREE: {"ids": _ID_LIST},
    Msg.REASON: {"obj": _INT, "reason": str},
    Msg.MODEL: {"rid": _INT, "graph": dict},
    Msg.PLAN_DEF: {"pid": _INT, "inputs": _INT, "actions": list, "outputs": list, "name": str},
    Msg.PLAN_RUN: {"pid": _INT, "args": list, "out": list},
    Msg.EPOCH: {"loader": _INT},
    Msg.BATCH: {"loader": _INT, "rids": list},
    Msg.FAILED: {"rid": _INT, "error": dict},
    Msg.QUEUED: {"id": _INT, "request": _INT},
    Msg.PROGRESS: {"id": _INT, "done": _INT, "total": _INT},
}
_RIDERS: Mapping[str, _Types] = {"free": _ID_LIST}


def problem(msg: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a decoded message, or None: an unknown type, or a field of the wrong type."""
    kind = msg.get("t")
    if not isinstance(kind, str) or kind not in FIELDS:
        return f"unknown message type {kind!r}"
    spec = FIELDS[kind]
    for name, value in msg.items():
        if name == "t" or value is None:
            continue
        expected = spec.get(name) or _RIDERS.get(name)
        if expected is None:
            continue  # payload fields (values, graphs, listings) are checked by their handlers
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            return f"field {name!r} of a {kind!r} message has the wrong type ({type(value).__name__})"
    return None


# -- errors on the wire ----------------------------------------------------------------------------

_ERROR_TYPES: Dict[str, Type[DuetError]] = {  # most specific first: error_to_wire takes the first match
    "UnknownObject": UnknownObject,
    "BudgetExceeded": BudgetExceeded,
    "NotAllowed": NotAllowed,
    "LimitExceeded": LimitExceeded,
    "ProtocolError": ProtocolError,
    "ConnectionLost": ConnectionLost,
}


def error_to_wire(exc: BaseException, op: str = "") -> Dict[str, Any]:
    """Describe an error for the peer without any value from the owner's data.

    Our own error types carry messages we wrote (they name operations and
    limits, never values). Any other exception is reduced to its type name.
    """
    if isinstance(exc, RequestDenied):
        return {"type": "RequestDenied", "message": exc.reason, "request": exc.request_id}
    if isinstance(exc, RemoteError):
        return {"type": "RemoteError", "op": exc.op, "exc_type": exc.exc_type, "message": exc.detail}
    for name, cls in _ERROR_TYPES.items():  # our own words, under the public class the peer knows
        if isinstance(exc, cls):
            return {"type": name, "message": str(exc)}
    return {"type": "RemoteError", "op": op, "exc_type": type(exc).__name__, "message": ""}


def error_from_wire(err: Any) -> Union[DuetError, Exception]:
    """Rebuild the error a peer described; anything unexpected is a ProtocolError."""
    if not isinstance(err, dict) or not isinstance(err.get("type"), str):
        return ProtocolError("malformed error from the peer")
    kind = err["type"]
    message = str(err.get("message") or "")
    if kind == "RequestDenied":
        req = err.get("request")
        return RequestDenied(message, req if isinstance(req, int) else None)
    if kind == "RequestTimeout":
        return RequestTimeout(message)
    if kind == "RemoteError":
        return RemoteError(str(err.get("op") or "operation"), str(err.get("exc_type") or "Exception"), message)
    cls = _ERROR_TYPES.get(kind)
    if cls is None:
        return RemoteError("operation", kind, message)
    return cls(message)
