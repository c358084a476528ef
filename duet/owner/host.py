"""The owner: published assets, connected scientists, and the permission queue.

Each scientist gets an object table and a worker thread that runs their
actions strictly in order, so a long training step never blocks the network
loop, and an approval never needs a notebook cell to be running.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import secrets
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import identity as identity_mod
from ..identity import HandshakeContext
from .. import wire
from ..ciphertext import Ciphertext
from ..errors import ConnectionLost, DuetError, LimitExceeded, NotAllowed, PairingError, RemoteError, RequestDenied
from .privacy.privacy import Privacy
from ..protocol import Msg, RequestKind, Status, error_to_wire, problem
from ..session import Session
from ..tables import html_table, text_table
from ..text import clean
from .audit import AuditLog
from .connection_state import LIVE, ConnState, check as check_transition
from . import frames, store as store_mod
from .executor import Executor, type_name, withheld_failure
from .federation import FederationPolicy, SecureSums
from .he import Encrypted, HEContext
from .smpc import SharedComputations
from .privacy import facts, mechanisms
from .privacy.ledger import Spend, check_epsilon
from .objects import Budget, Limits, ObjectTable, RemoteObject
from .requests import Request, RequestQueue, Requester
from .store import AssetStore

log = logging.getLogger("duet.owner")

APPROVE_MODES = ("auto", "everything")
REFUSED_LABELS = ("refused action", "action")
HANDSHAKE_TIMEOUT = 30.0  # seconds a new link has to send a verified hello
MAX_FAILURES_KEPT = 10_000
CONNECTION_FAILURES_KEPT = 20  # failed pairings the panel can show
_STOP = object()


def snapshot(value: Any, depth: int = 0) -> Any:
    """A detached copy of what would be released, fixed at request time."""
    if depth > 8:
        raise NotAllowed("the value is nested too deeply to release")
    if isinstance(value, Encrypted):
        return value.to_wire()  # serialized now; only the scientist's secret key opens it
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, torch.nn.Module):
        return {"$module": type(value).__name__, "state": {k: v.detach().clone() for k, v in value.state_dict().items()}}
    if isinstance(value, torch.optim.Optimizer):
        raise NotAllowed("an optimizer cannot be released; release the model it trains")
    if isinstance(value, torch.distributions.Distribution):
        raise NotAllowed("a distribution cannot be released; release its parameters (.loc, .probs, ...) or a sample")
    if isinstance(value, (list, tuple)):
        items = [snapshot(v, depth + 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: snapshot(v, depth + 1) for k, v in value.items()}
    if frames.kind(value) is not None:
        return frames.snapshot(value)  # a deep copy of a DataFrame or Series
    return value


def size_of(value: Any) -> tuple:
    """(numel, nbytes) of a snapshot, for the queue and size rules.

    Counted by what a value can carry, so a size rule ("at most one element") cannot be
    met by packing many values into one: a string counts one element per character, a
    dict's keys count as well as its values, an empty container or tensor still counts
    (its shape or length is information) and integers are at most 64 bits on the wire.
    """
    if frames.kind(value) is not None:
        return frames.size_of(value)  # every value, index entry and name of a DataFrame or Series
    if isinstance(value, (torch.Tensor, np.ndarray)):
        numel = int(value.numel() if isinstance(value, torch.Tensor) else value.size)
        nbytes = int(value.element_size() * numel if isinstance(value, torch.Tensor) else value.nbytes)
        return max(numel, value.ndim), nbytes  # an empty tensor's shape is numbers too: (10, 20, 0)
    if isinstance(value, Ciphertext):
        return max(value.size, 1), value.nbytes  # encrypted numbers: what the scientist's key opens
    if isinstance(value, dict) and "$module" in value:
        parts = [size_of(v) for v in value["state"].values()]  # names come from the model's structure
    elif isinstance(value, dict):
        parts = [size_of(v) for pair in value.items() for v in pair]
    elif isinstance(value, (list, tuple, set, frozenset)):
        parts = [size_of(v) for v in value]
    elif isinstance(value, (str, bytes)):
        n = len(value.encode() if isinstance(value, str) else value)
        return len(value), n
    else:
        return 1, 8
    # An empty container still says it is there: a list of 99 empty lists carries the number 99.
    return max(sum(p[0] for p in parts), 1), sum(p[1] for p in parts)


def _shape_tuple(value: Any) -> Optional[Tuple[int, ...]]:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _dtype_text(value: Any) -> Optional[str]:
    dtype = getattr(value, "dtype", None)
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _length(value: Any) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0:
        return int(value.shape[0])
    return None


class _EarlierFailure(Exception):
    """The object asked about was never created; carries the original error, as sent then."""

    def __init__(self, error: Dict[str, Any]) -> None:
        super().__init__("earlier failure")
        self.error = error


class ScientistConnection:
    """One connected scientist: identity, objects, and an ordered action worker."""

    def __init__(self, owner: "Owner", session: Session, ctx: HandshakeContext) -> None:
        self.owner = owner
        self.session = session
        self.ctx = ctx
        self.requester: Optional[Requester] = None
        self.state = ConnState.HANDSHAKE
        self.objects = ObjectTable(owner.limits)
        self.executor = Executor(self.objects)
        self.he_context: Any = None  # the scientist's public CKKS context (duet.owner.he.HEContext), once sent
        from .training import TrainingHandlers  # models, plans, remote loaders

        self.training = TrainingHandlers(self)
        # What the worker does with each message type (the scientist's side sends these; see duet.protocol).
        self._handlers: Dict[str, Callable[[Dict[str, Any]], None]] = {
            Msg.CALL: self._run_call,
            Msg.PUT: self._put,
            Msg.FREE: lambda msg: self._free_ids(msg.get("ids")),
            Msg.REASON: self._amend_reason,
            Msg.REQ: self._handle_request,
            **self.training.handlers(),
        }
        self._request_handlers: Dict[str, Callable[[int, Dict[str, Any]], None]] = {
            RequestKind.STORE: lambda req_id, _msg: self.session.reply(req_id, self.owner.store.listing()),
            RequestKind.ASSET: self._point_at_asset,
            RequestKind.META: lambda req_id, msg: self.session.reply(req_id, self._meta(self._object(msg.get("obj")))),
            RequestKind.RELEASE: self._release,
            RequestKind.LOADER: lambda req_id, msg: self.session.reply(req_id, self.training.open_loader(msg)),
            RequestKind.PING: lambda req_id, _msg: self.session.reply(req_id, "pong"),
            RequestKind.PRIVACY: self._privacy,
            RequestKind.DP_TRAIN: self._dp_train,
            RequestKind.SECURE_SUM: lambda req_id, msg: self.secure_sums.handle(req_id, msg),
            RequestKind.HE_CONTEXT: self._he_context,
            RequestKind.SMPC: lambda req_id, msg: self.shared.handle(req_id, msg),
        }
        self.secure_sums = SecureSums(self)
        self.shared = SharedComputations(self)
        self.failures: Dict[int, Dict[str, Any]] = {}
        self.connected_at = time.time()
        # Resume: a dropped link suspends this connection (objects, requests and
        # worker kept) until the owner's resume window passes.
        self.resume_token = secrets.token_bytes(16)
        self._left = False  # the scientist said goodbye: nothing to resume
        self._suspend_timer: Any = None
        self._releases: Dict[Any, Request] = {}  # object id (or (id, "dp", epsilon)) -> its release request, until delivered
        # queue request id -> (session, request id there) to answer; a reply meant for a dropped
        # link waits for the scientist's next ask of the same object
        self._reply_to: Dict[int, Tuple[Session, int]] = {}
        self._held: Dict[int, int] = {}  # queue request id -> bytes its snapshot holds, until sent or dropped
        self._delivered: Dict[int, None] = {}  # queue request ids whose outcome reached the scientist (recent ones)
        self._requests: List[Request] = []
        self._inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._queued = 0
        self._queued_bytes = 0  # bytes of the messages waiting for the worker
        self._queued_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="duet-owner-worker", daemon=True)
        self._worker.start()
        session.set_handler(self._on_message)
        session.on_close(self._on_close)
        from .. import runtime

        runtime.call_soon(lambda: runtime.loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_deadline))

    def _to(self, new: ConnState) -> bool:
        """Move to `new` if the state machine allows it from here (duet.owner.connection_state)."""
        who = self.requester.name if self.requester else self.ctx.scientist_name
        if not check_transition(self.state, new, who):
            return False
        self.state = new
        return True

    # -- inbound (runtime loop thread) -------------------------------------------
    def _on_message(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("t")
        if self.state == ConnState.HANDSHAKE:
            if kind == Msg.HELLO:
                self._on_hello(msg)
            else:
                log.warning("scientist sent %r before the handshake; closing", kind)
                self._drop("protocol violation during the handshake")
            return
        if self.state != ConnState.ACTIVE:
            return
        if kind == Msg.INVALID:
            return
        if kind == Msg.LEAVE:
            self._left = True
            return
        size = getattr(self.session, "last_message_bytes", 0)
        with self._queued_lock:
            # Round trips (get, ping, listings) get a higher ceiling: an honest
            # scientist waits for each, and refusing them would fail a get()
            # merely because actions are backed up.
            ceiling = self.owner.limits.max_queued_actions * (10 if kind == Msg.REQ else 1)
            too_many = self._queued >= ceiling
            too_big = self._queued_bytes + size > self.owner.limits.max_queued_bytes and self._queued > 0
            if (too_many or too_big) and kind != Msg.FREE:
                rid = msg.get("rid")
                error = LimitExceeded(
                    f"too many queued actions ({self.owner.limits.max_queued_actions}); wait for earlier ones" if too_many
                    else f"too many bytes queued ({self.owner.limits.max_queued_bytes}); wait for earlier actions")
                if kind == Msg.REQ and isinstance(msg.get("id"), int):
                    self.session.reply(msg["id"], error=error)
                else:  # reported even without a result id, so nothing is lost silently
                    self._fail(rid if isinstance(rid, int) else None, error, "queue")
                return
            self._queued += 1
            self._queued_bytes += size
        self._inbox.put((msg, size))

    def _on_hello(self, msg: Dict[str, Any]) -> None:
        pub, sig = msg.get("pub"), msg.get("sig")
        try:
            if not isinstance(pub, bytes) or not isinstance(sig, bytes) or len(pub) != 32:
                raise PairingError("malformed hello")
            identity_mod.verify(pub, self.ctx.transcript("scientist", pub), sig)
        except PairingError as exc:
            log.warning("scientist identity did not verify: %s", exc)
            self._drop(f"identity verification failed: {exc}")
            return
        self.requester = Requester(name=clean(self.ctx.scientist_name, limit=80), fingerprint=identity_mod.fingerprint(pub))
        self.owner.privacy.names[self.requester.fingerprint] = self.requester.name
        token = msg.get("resume")
        if isinstance(token, bytes):
            self._resume(token)
            return
        others = self.owner.sessions_of(self.requester.fingerprint, besides=self)
        if others >= self.owner.limits.max_sessions_per_key:
            log.warning("refused a session: key %s already has %d", self.requester.fingerprint, others)
            self._reject(f"this identity key already has {others} sessions with this owner "
                         f"(at most {self.owner.limits.max_sessions_per_key}); close one first")
            return
        self.objects.share_budget(self.owner.budget_of(self.requester.fingerprint))
        if self.owner.approve_joins:
            self._to(ConnState.JOINING)
            self._requests.append(
                self.owner.requests.submit(
                    {"kind": "join", "requester": self.requester, "reason": clean(msg.get("reason") or "", newlines=True)},
                    self._on_join_decided,
                )
            )
        else:
            self._welcome()

    def _reject(self, reason: str) -> None:
        try:
            self.session.send({"t": Msg.REJECTED, "reason": reason})
        except ConnectionLost:
            pass
        self._to(ConnState.REJECTED)
        self.owner._forget(self)
        self.stop_worker(0)
        from .. import runtime

        runtime.submit(self.session.close())

    def _handshake_deadline(self) -> None:
        """A link that never proves who it is must not hold a worker and a queue forever."""
        if self.state == ConnState.HANDSHAKE:
            log.warning("no verified hello within %g s; closing the link", HANDSHAKE_TIMEOUT)
            self._drop(f"no verified hello within {HANDSHAKE_TIMEOUT:g} s")
            self._finish("the handshake timed out")

    def _on_join_decided(self, req: Request) -> None:
        if req.status == Status.ACCEPTED:
            self._welcome()
        elif self._to(ConnState.REJECTED):  # not when the link closed first (the join was cancelled then)
            try:
                self.session.send({"t": Msg.REJECTED, "reason": req.deny_reason or "the owner declined the join"})
            except ConnectionLost:
                pass
            self.owner._forget(self)

    def _welcome(self, resumed: bool = False) -> None:
        ident = self.owner.identity
        assert self.requester is not None, "welcomed before the hello verified"
        if not self._to(ConnState.ACTIVE):
            return
        self.owner.audit.append(
            "resume" if resumed else "join", scientist=self.requester.name, fingerprint=self.requester.fingerprint
        )
        self.session.send(
            {
                "t": Msg.WELCOME,
                "pub": ident.public_key,
                "sig": ident.sign(self.ctx.transcript("owner", ident.public_key)),
                "approve": self.owner.approve,
                "resume": self.resume_token,
                "resumed": resumed,
            }
        )
        # Both identities are now bound to this channel: offer the direct path for large transfers.
        start_fast_path = getattr(self.session.transport, "start", None)
        if start_fast_path is not None:
            start_fast_path(self.ctx.fast_path_context())
        start_warm_up()
        self.owner._changed()

    def _resume(self, token: bytes) -> None:
        """A returning scientist: hand this new link to their suspended connection."""
        assert self.requester is not None
        old = self.owner._take_suspended(token, self.requester.fingerprint)
        if old is None:
            self._to(ConnState.REJECTED)
            try:
                self.session.send({"t": Msg.REJECTED, "reason": "nothing to resume: the owner's resume window passed, or it restarted"})
            except ConnectionLost:
                pass
            self.owner._forget(self)
            self.stop_worker(0)
            return
        self._to(ConnState.MERGED)
        self.owner._forget(self)
        self.stop_worker(0)
        old.adopt(self.session, self.ctx)

    def adopt(self, session: Session, ctx: HandshakeContext) -> None:
        """Continue over a new link, with everything kept from before the drop."""
        if self._suspend_timer is not None:
            self._suspend_timer.cancel()
            self._suspend_timer = None
        self.session = session
        self.ctx = ctx
        session.set_handler(self._on_message)
        session.on_close(self._on_close)
        self._welcome(resumed=True)

    def _drop(self, reason: str) -> None:
        self._to(ConnState.CLOSED)
        try:
            self.session.send({"t": Msg.BYE, "reason": reason})
        except ConnectionLost:
            pass
        from .. import runtime

        runtime.submit(self.session.close())

    def _on_close(self, reason: Optional[BaseException]) -> None:
        if self.state in (ConnState.MERGED, ConnState.SUSPENDED, ConnState.FINISHED):
            return
        if self.state == ConnState.ACTIVE and not self._left and not self.owner.closed and self.owner.resume_window > 0:
            self._to(ConnState.SUSPENDED)
            from .. import runtime

            window = self.owner.resume_window
            self._suspend_timer = runtime.loop().call_later(
                window, self._finish, f"the scientist did not come back within {window:g} s"
            )
            log.info("link to %s dropped; keeping their session for %g s", self.requester.name if self.requester else "?", window)
            self.owner._changed()
            return
        self._finish("the scientist disconnected")

    def _finish(self, reason: str) -> None:
        """Forget this scientist for good: stop the worker, cancel their pending requests."""
        if not self._to(ConnState.FINISHED):
            return
        self._inbox.put(_STOP)
        for req in list(self._requests):
            if req.pending:
                try:
                    self.owner.requests.decide(req, Status.CANCELLED, by="system", reason=reason)
                except ValueError:
                    pass
        self.owner._forget(self)

    # -- the worker (one thread per scientist) -------------------------------------
    def stop_worker(self, timeout: float) -> None:
        """Let the worker finish its current action and stop; bounded."""
        self._inbox.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                self.objects.clear()
                return
            msg, size = item
            with self._queued_lock:
                self._queued -= 1
                self._queued_bytes -= size
            try:
                self._handle(msg)
            except Exception:  # the worker must survive anything a scientist sends
                log.exception("unexpected error while handling a %r message", msg.get("t"))

    def _handle(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("t")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            log.warning("unknown message type %r from scientist", kind)
            return
        wrong = problem(msg)
        if wrong is not None:
            rid, req_id = msg.get("rid"), msg.get("id")
            error = NotAllowed(f"malformed message: {wrong}")
            if kind == Msg.REQ and type(req_id) is int:
                self.session.reply(req_id, error=error)
            else:  # reported even without a valid result id, so nothing is lost silently
                self._fail(rid if type(rid) is int else None, error, str(kind))
            return
        freed = msg.get("free")
        if freed is not None and kind != Msg.FREE:  # frees riding on an action go first
            self._free_ids(freed)
        handler(msg)

    def _put(self, msg: Dict[str, Any]) -> None:
        rid = msg.get("rid")
        if isinstance(rid, int):
            try:
                self.objects.put(rid, msg.get("value"), lineage=(), ops=["upload"])
            except DuetError as exc:
                self._fail(rid, exc, "upload")

    def _free_ids(self, ids: Any) -> None:
        if isinstance(ids, list):
            for rid in ids:
                if isinstance(rid, int):
                    self.objects.free(rid)
                    self.failures.pop(rid, None)

    def _fail(self, rid: Optional[int], exc: BaseException, op: str) -> None:
        err = error_to_wire(exc, op)
        if rid is not None:
            self.failures[rid] = err
            if len(self.failures) > MAX_FAILURES_KEPT:
                self.failures.pop(next(iter(self.failures)))
        try:
            self.session.send({"t": Msg.FAILED, "rid": rid, "error": err})
        except ConnectionLost:
            pass

    def _run_call(self, msg: Dict[str, Any]) -> None:
        rid = msg.get("rid")
        rid = rid if isinstance(rid, int) else None
        kind, name = msg.get("kind"), msg.get("name")
        args, kwargs = msg.get("args", []), msg.get("kwargs", {})
        if not isinstance(kind, str) or not isinstance(name, str):
            self._fail(rid, NotAllowed("malformed action"), "action")
            return
        label = name
        inputs: List[int] = []
        rng = self.executor.randomness.for_action()  # one step per message, whatever happens to it
        try:
            label = self.executor.describe(kind, name, args if isinstance(args, list) else [])
            inputs = self.executor.inputs_of(args, kwargs)
            for ref in inputs:
                if ref in self.failures:
                    if rid is not None:
                        self.failures[rid] = self.failures[ref]
                    self.session.send({"t": Msg.FAILED, "rid": rid, "error": self.failures[ref]})
                    return
            if self.owner.approve == "everything" and label not in REFUSED_LABELS:
                self._await_compute_approval(label, inputs, msg)  # only names Duet checked are shown
            self.executor.run(rid, kind, name, args, kwargs, rng=rng)
        except DuetError as exc:
            self._fail(rid, exc, label)
        except Exception as exc:
            log.warning("%s failed for %s", label, self.requester.name if self.requester else "?", exc_info=True)
            self._fail(rid, self._withheld(exc, label, inputs), label)

    def _withheld(self, exc: BaseException, label: str, inputs: List[int]) -> BaseException:
        """A library error on private inputs: which kind of error it was may depend on the values.

        The scientist learns that the operation failed (the documented one-bit
        channel), never why; the owner's log keeps the traceback.
        """
        try:
            private = bool(self.executor.lineage_of([r for r in inputs if r in self.objects])[0])
        except DuetError:
            private = True
        if not private:
            return exc
        return RemoteError(label, "Error", "the details are withheld because the inputs derive from private data; "
                                           "the owner's log has them")

    def _await_compute_approval(self, label: str, inputs: List[int], msg: Dict[str, Any]) -> None:
        lineage, ops, _ = self.executor.lineage_of(inputs)
        self.await_approval(
            {"kind": "compute", "lineage": tuple(sorted(lineage)), "ops": tuple(ops + [label]), "type_name": label},
            denied="the owner did not approve this computation")

    def await_approval(self, fields: Dict[str, Any], denied: str) -> Request:
        """Queue a request (for this scientist) and block this worker until the owner decides.

        One wait for actions and plans alike: a dropped link may resume, so only the end of the
        connection (finished: its pending requests are then cancelled) ends the wait early.
        RequestDenied unless accepted.
        """
        decided = threading.Event()
        req = self.owner.requests.submit({**fields, "requester": self.requester}, lambda _r: decided.set())
        self._requests.append(req)
        del self._requests[:-1000]
        while not decided.wait(0.5):
            if self.state == ConnState.FINISHED:
                raise NotAllowed("the session ended before the owner decided")
        if req.status != Status.ACCEPTED:
            raise RequestDenied(req.deny_reason or denied, req.id)
        return req

    # -- requests (round trips) --------------------------------------------------
    def _handle_request(self, msg: Dict[str, Any]) -> None:
        req_id = msg.get("id")
        if not isinstance(req_id, int):
            return
        what = msg.get("kind")
        try:
            handler = self._request_handlers.get(what) if isinstance(what, str) else None
            if handler is None:
                raise NotAllowed(f"unknown request kind {what!r}")
            handler(req_id, msg)
        except _EarlierFailure as exc:
            self.session.reply_error(req_id, exc.error)
        except DuetError as exc:
            self.session.reply(req_id, error=exc, op=str(what))
        except Exception as exc:
            log.warning("request %r failed", what, exc_info=True)
            self.session.reply(req_id, error=exc, op=str(what))

    def _object(self, rid: Any) -> RemoteObject:
        if not isinstance(rid, int):
            raise NotAllowed("malformed object id")
        if rid in self.failures:
            raise _EarlierFailure(self.failures[rid])
        return self.objects.get(rid)

    def _point_at_asset(self, req_id: int, msg: Dict[str, Any]) -> None:
        name, rid = msg.get("name"), msg.get("rid")
        if not isinstance(name, str) or not isinstance(rid, int):
            raise NotAllowed("malformed asset request")
        if name not in self.owner.store:
            raise NotAllowed(f"no asset named {name!r} is published")
        asset = self.owner.store.get(name)
        value = asset.value
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        elif isinstance(value, np.ndarray):
            value = value.copy()
        elif frames.kind(value) is not None:
            value = frames.copy(value)
        elif store_mod.is_python_value(value):
            value = snapshot(value)  # tensors cloned, arrays and containers copied
        elif isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value)  # the scientist's copy: training it changes nothing published
        else:
            raise NotAllowed(f"asset {name!r} is a dataset; iterate it with scientist.loader({name!r})")
        # Numbers in a published list or dict are values; anything computed from the container could
        # carry them as if they were metadata (a shape, an index), so all of its metadata is private.
        # A published model's architecture is the owner's: what it computes has private metadata too.
        meta = {name} if store_mod.holds_numbers(value) or isinstance(value, torch.nn.Module) else set()
        obj = self.objects.put(rid, value, lineage={name}, ops=[name], meta=meta)
        if asset.privacy is not None:
            obj.dp = facts.from_asset(asset, asset.privacy)
        self.session.reply(req_id, asset.public_info())

    def _he_context(self, req_id: int, msg: Dict[str, Any]) -> None:
        """The scientist's public encryption context: its ciphertexts are computed on with it, here,
        without the secret key (refused if it is in there)."""
        data = msg.get("context")
        if not isinstance(data, Ciphertext):
            raise NotAllowed("he_context takes a public context")
        if self.he_context is not None:
            self.objects.hold(-self.he_context.nbytes)
        self.he_context = self.executor.he_context = None  # (a replacement that fails leaves none, not the old one)
        self.objects.check_room(data.nbytes)
        ctx = HEContext(data)
        self.objects.check_room(ctx.nbytes)  # what its keys hold in memory, not their size on the wire
        self.objects.hold(ctx.nbytes)
        self.he_context = self.executor.he_context = ctx
        self.owner.audit.append("he_context", scientist=self.requester.name if self.requester else "",
                                fingerprint=self.requester.fingerprint if self.requester else "",
                                digest=data.context.hex(), bytes=data.nbytes)
        self.session.reply(req_id, {"digest": data.context})

    def _meta(self, obj: RemoteObject) -> Dict[str, Any]:
        """What the scientist may know of an object: its metadata only if nothing private shaped it."""
        value = obj.value
        public = obj.shape_public
        shape = getattr(value, "shape", None) if public else None
        dtype = getattr(value, "dtype", None) if public else None
        return {
            "type": type_name(value) if public else None,
            "shape": [int(s) for s in shape] if shape is not None else None,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
            "private": obj.private,
            "assets": sorted(obj.lineage),
            # Which group an object with private metadata joined (and so the history it shares) can
            # depend on private types: its operations are the owner's to see, not the scientist's.
            "ops": list(obj.group.ops.labels()) if public else None,
            "requires_grad": bool(getattr(value, "requires_grad", False)) if public else None,
            "metadata_private": not public,
            # How many values iterating gives (tuple and list items, a tensor's rows): as public as the shape.
            "length": _length(value) if public else None,
            # Whether a release with dp= is possible, and why not: from declared facts only.
            "dp": facts.describe(obj.dp, obj.dp_why),
        }

    def _release(self, req_id: int, msg: Dict[str, Any]) -> None:
        rid = msg.get("obj")
        if msg.get("dp") is not None:
            self._dp_release(req_id, msg)
            return
        earlier = self._releases.get(rid) if isinstance(rid, int) else None
        if earlier is not None:  # asked again (e.g. after a resume): same request, same decision
            self._reply_to[earlier.id] = (self.session, req_id)
            if earlier.pending:
                self.session.send({"t": Msg.QUEUED, "id": req_id, "request": earlier.id})
            else:
                self._deliver(earlier)
                self._drop_snapshot_if_done(earlier)
            return
        obj = self._object(rid)
        reason = clean(msg.get("reason") or "", newlines=True)  # shown to the owner: no control or bidi characters
        if obj.private:
            # Each pending release holds a snapshot until decided: bounded in number and in bytes.
            pending = sum(1 for r in self._releases.values() if r.pending)
            if pending >= self.owner.limits.max_pending_releases:
                raise LimitExceeded(f"too many releases waiting for the owner ({self.owner.limits.max_pending_releases}); "
                                    "wait for a decision")
            self.objects.check_room(obj.nbytes)
        value = snapshot(obj.value)
        numel, nbytes = size_of(value)
        if not obj.private:
            self._send_release(req_id, value, request=None, private=False)
            return
        shape = getattr(obj.value, "shape", None)
        dtype = getattr(obj.value, "dtype", None)
        what = type_name(obj.value)
        if isinstance(obj.value, Encrypted) and obj.value.carries:
            # CKKS hides nothing of how a result was computed from the holder of the secret key: a
            # scientist with keys of its own making reads every plain number that went into it.
            numel = max(numel, obj.value.size + obj.value.carries)
            what = (f"Encrypted: {obj.value.size} numbers + the {obj.value.carries} plain numbers it was computed "
                    "with (a scientist's own keys read them)")
        fields = {
            "kind": "release",
            "requester": self.requester,
            "lineage": tuple(sorted(obj.lineage)),
            "ops": obj.group.ops.labels(),
            "type_name": what,
            "shape": tuple(int(s) for s in shape) if shape is not None else None,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
            "numel": numel,
            "nbytes": nbytes,
            "reason": reason,
            "value": value,
        }

        self.objects.hold(nbytes)
        holder: Dict[str, int] = {}

        def deliver(decided: Request) -> None:
            holder.setdefault("id", decided.id)
            self._held.setdefault(decided.id, nbytes)
            self._deliver(decided)
            self._drop_snapshot_if_done(decided)

        assert isinstance(rid, int)  # _object() checked it
        req = self._submit(fields, deliver, reply_to=req_id, obj=rid)
        if "id" not in holder:
            self._held[req.id] = nbytes
        if req.pending:
            try:
                self.session.send({"t": Msg.QUEUED, "id": req_id, "request": req.id})
            except ConnectionLost:
                pass

    def _dp_release(self, req_id: int, msg: Dict[str, Any]) -> None:
        """A differentially private release: charged to the scientist's budget, noisy, computed again
        from the published asset; an owner rule with dp=True sends it at once, else the owner decides.

        The budget is reserved before anything is computed (BudgetExceeded charges nothing), committed
        when the value is sent, and refunded if the owner denies it or it expires.
        """
        rid, epsilon = msg.get("obj"), msg.get("dp")
        key = (rid, "dp", epsilon)
        earlier = self._releases.get(key)
        if earlier is not None:  # asked again (a timed-out get, a resume): the same request, charged once
            self._reply_to[earlier.id] = (self.session, req_id)
            if earlier.pending:
                self.session.send({"t": Msg.QUEUED, "id": req_id, "request": earlier.id})
            else:
                self._deliver(earlier)
                self._drop_snapshot_if_done(earlier)
            return
        obj = self._object(rid)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            raise NotAllowed("dp= takes epsilon, a number > 0")
        try:
            epsilon = check_epsilon(epsilon)
        except ValueError as exc:
            raise NotAllowed(f"dp={epsilon!r}: {exc}") from None
        if not obj.private:
            raise NotAllowed("this value is not private: .get() it without dp=")
        fact = obj.dp
        if not isinstance(fact, facts.Aggregate):
            why = facts.describe(fact, obj.dp_why).get("why")
            raise NotAllowed(f"this value cannot be released with dp=: {why}")
        try:
            facts.check_sources(fact, self.owner.store)
            plan = mechanisms.plan(fact, epsilon)
            facts.check_row_wise(fact.rows)
        except (LookupError, mechanisms.Unreleasable, facts.Refused) as exc:
            raise NotAllowed(f"this value cannot be released with dp=: {exc}") from None
        pending = sum(1 for r in self._releases.values() if r.pending)
        if pending >= self.owner.limits.max_pending_releases:
            raise LimitExceeded(f"too many releases waiting for the owner ({self.owner.limits.max_pending_releases}); "
                                "wait for a decision")
        assert self.requester is not None
        what = f"{' → '.join(fact.ops)} ({plan.mechanism})"
        reservation = self.owner.privacy.ledger.reserve(self.requester.fingerprint, Spend.laplace(epsilon), what)
        try:
            value = mechanisms.release(fact, plan)
        except Exception:
            reservation.refund()  # nothing was released; the failure itself is withheld below
            log.warning("a DP release failed", exc_info=True)
            raise withheld_failure("dp release") from None
        numel, nbytes = size_of(value)
        reason = clean(msg.get("reason") or "", newlines=True)
        fields = {
            "kind": "release", "requester": self.requester, "lineage": tuple(sorted(obj.lineage)),
            "ops": tuple(fact.ops), "type_name": type_name(value), "shape": _shape_tuple(value), "dtype": _dtype_text(value),
            "numel": numel, "nbytes": nbytes, "reason": reason, "value": value,
            "dp_epsilon": epsilon, "dp_mechanism": plan.describe(),
        }
        self.objects.hold(nbytes)
        was_decided = []

        def decided(req: Request) -> None:
            was_decided.append(True)
            if req.status == Status.ACCEPTED:
                reservation.commit()
                req.dp_charge = {**plan.public(), **self._budget_left()}
            else:
                reservation.refund()
            self._held.setdefault(req.id, nbytes)
            self._deliver(req)
            self._drop_snapshot_if_done(req)

        req = self._submit(fields, decided, reply_to=req_id, obj=key)
        if not was_decided:  # (a rule that decided inside submit already settled the snapshot's bytes)
            self._held[req.id] = nbytes
        if req.pending:
            try:
                self.session.send({"t": Msg.QUEUED, "id": req_id, "request": req.id})
            except ConnectionLost:
                pass

    def _budget_left(self) -> Dict[str, float]:
        assert self.requester is not None
        s = self.owner.privacy.summary(self.requester.fingerprint)
        return {"spent_epsilon": s["spent_epsilon"], "left_epsilon": s["left_epsilon"], "budget_epsilon": s["budget_epsilon"]}

    def _privacy(self, req_id: int, _msg: Dict[str, Any]) -> None:
        """The scientist's own budget and releases (never another scientist's)."""
        if self.requester is None:
            raise NotAllowed("not joined")
        self.session.reply(req_id, self.owner.privacy.summary(self.requester.fingerprint))

    def _dp_train(self, req_id: int, msg: Dict[str, Any]) -> None:
        """DP-SGD on a copy of the scientist's model (duet.owner.privacy.training); the trained copy is
        stored under `rid` as a public object: a differentially private release, charged up front."""
        from .privacy import training as dp_training

        if self.requester is None:
            raise NotAllowed("not joined")
        spec = dp_training.Spec.parse(msg)
        rid, name = msg.get("rid"), msg.get("name")
        if type(rid) is not int or rid < 0 or not isinstance(name, str):
            raise NotAllowed("malformed DP training request")
        model, optimizer = self._object(msg.get("model")), self._object(msg.get("optimizer"))
        if not isinstance(model.value, torch.nn.Module) or not isinstance(optimizer.value, torch.optim.Optimizer):
            raise NotAllowed("DP training takes a model you sent and an optimizer made on the owner")
        if model.private or optimizer.private:
            raise NotAllowed("DP training starts from a model and an optimizer of your own; these already derive from "
                             f"private data ({', '.join(sorted(model.lineage | optimizer.lineage))})")
        if name not in self.owner.store:
            raise NotAllowed(f"no asset named {name!r} is published")
        asset = self.owner.store.get(name)
        if not asset.items_are_people:
            raise NotAllowed(f"asset {name!r} is not published for DP training (the owner declares "
                             'privacy_unit="item": one item per person)')
        fingerprint = self.requester.fingerprint
        budget = self.owner.privacy.ledger.budget_of(fingerprint)
        what = f"DP-SGD on {name}: {spec.epochs} epoch(s), batch {spec.batch_size}"

        def progress(done: int, total: int) -> None:
            try:
                self.session.send({"t": Msg.PROGRESS, "id": req_id, "done": done, "total": total})
            except ConnectionLost:
                pass

        try:
            outcome = dp_training.train(
                model.value, optimizer.value, asset.value, spec, budget.delta if budget else 0.0,
                reserve=lambda spend: self.owner.privacy.ledger.reserve(fingerprint, spend, what),
                randomness=self.executor.randomness.for_action(), progress=progress)
        except dp_training.TrainingFailed:
            # After private examples were read: charged, and why it failed may depend on them.
            raise withheld_failure("DP training") from None
        self.objects.put(rid, outcome.model, lineage=(), ops=["DP training"])
        self.owner.audit.append("dp_training", scientist=self.requester.name, fingerprint=fingerprint, asset=name,
                                epsilon=outcome.epsilon, delta=outcome.delta, steps=outcome.steps,
                                sampling_rate=outcome.sampling_rate, noise_multiplier=outcome.noise_multiplier)
        self.session.reply(req_id, {"epsilon": outcome.epsilon, "delta": outcome.delta, "steps": outcome.steps,
                                    "sampling_rate": outcome.sampling_rate, "noise_multiplier": outcome.noise_multiplier,
                                    "seconds": outcome.seconds, **self._budget_left()})

    def _amend_reason(self, msg: Dict[str, Any]) -> None:
        """A new reason for a release still waiting (asked again after a timed-out get); decided ones stay."""
        rid, reason = msg.get("obj"), msg.get("reason")
        req = self._releases.get(rid) if isinstance(rid, int) else None
        if req is not None and req.pending and isinstance(reason, str) and reason:
            self.owner.requests.amend_reason(req, clean(reason, newlines=True))

    def _drop_snapshot_if_done(self, req: Request) -> None:
        """A snapshot stops counting once it was sent, or the request was denied, expired or cancelled."""
        if not req.pending and (req.status != Status.ACCEPTED or req.value is None):
            n = self._held.pop(req.id, 0)
            if n:
                self.objects.hold(-n)

    def _submit(self, fields: Dict[str, Any], on_decided: Callable[[Request], None], reply_to: int, obj: Any) -> Request:
        """Queue a release request, remembered per object until its outcome reaches the scientist."""
        session = self.session

        def remember_then_decide(req: Request) -> None:
            # A rule may decide inside submit(): register first, or the outcome has nowhere to go.
            if req.id not in self._delivered:
                self._reply_to.setdefault(req.id, (session, reply_to))
                self._releases.setdefault(obj, req)
            on_decided(req)

        req = self.owner.requests.submit(fields, remember_then_decide)
        if req.id not in self._delivered:  # not already decided and delivered by a rule
            self._reply_to.setdefault(req.id, (session, reply_to))
            self._releases.setdefault(obj, req)
        self._requests.append(req)
        del self._requests[:-1000]
        return req

    def _deliver(self, req: Request) -> None:
        """Send a decided release to the scientist, unless their link is down (then on their next ask)."""
        if req.pending:
            return
        target = self._reply_to.get(req.id)
        if target is None:
            return
        session, req_id = target
        if session is not self.session or session.closed:
            return  # asked over a link that dropped: kept until the scientist asks again
        del self._reply_to[req.id]
        self._delivered[req.id] = None
        while len(self._delivered) > 10_000:
            self._delivered.pop(next(iter(self._delivered)))
        self._releases = {k: v for k, v in self._releases.items() if v is not req}
        if req.status == Status.ACCEPTED:
            self._send_release(req_id, req.value, request=req, private=True, dp=req.dp_charge)
            req.value = None
        else:
            self.session.reply(req_id, error=RequestDenied(req.deny_reason, req.id))

    def _send_release(self, req_id: int, value: Any, request: Optional[Request], private: bool,
                      dp: Optional[Dict[str, Any]] = None) -> None:
        # `value` is a snapshot (see `snapshot`) or computed for this release alone: no one writes it
        # again, so it travels inside the reply as a bin sent from its own memory, not copied.
        payload = wire.encode_parts(value, owned=True)
        hasher = hashlib.sha256()
        for part in payload.parts:
            hasher.update(part)
        digest = hasher.hexdigest()
        self.owner.audit.append(
            "release",
            request=request.id if request else None,
            private=private,
            scientist=self.requester.name if self.requester else "",
            fingerprint=self.requester.fingerprint if self.requester else "",
            assets=list(request.lineage) if request else [],
            sha256=digest,
            bytes=len(payload),
            **({"dp_epsilon": dp["epsilon"]} if dp else {}),
        )
        self.session.reply(req_id, {"encoded": payload, "sha256": digest, **({"dp": dp} if dp else {})})

    @property
    def route(self) -> Any:
        """How this scientist's link is made (duet.transport.route.Route); None for an in-process pair."""
        return getattr(self.session.transport, "route", None)

    def summary(self) -> List[Any]:
        r = self.requester
        route = self.route
        return [r.name if r else self.ctx.scientist_name, r.fingerprint if r else "", self.state, len(self.objects),
                str(route) if route is not None else ""]


_warmed = threading.Event()  # set when the warm-up starts (once per process)
_warm_done = threading.Event()


def wait_warm_up(timeout: float) -> bool:
    """Wait for the one-time warm-up thread; benchmarks call it so it does not share their CPU time."""
    return _warm_done.wait(timeout) if _warmed.is_set() else True


def start_warm_up() -> None:
    """Warm up once per process, after the first join (started earlier, it slowed the join down)."""
    if _warmed.is_set():
        return
    _warmed.set()
    threading.Thread(target=_warm_meta_tensors, name="duet-warm-up", daemon=True).start()
    # A daemon thread still inside torch's imports when the interpreter finalizes aborts the
    # process ("terminate called without an active exception"): a script that joins and exits at
    # once must not crash, so exit waits for the warm-up (about a second).
    atexit.register(_warm_done.wait, 60)


def _warm_meta_tensors() -> None:
    """Import what the first shadow run needs, so a session's first release does not wait ~1 s for it.

    torch loads its meta-tensor registrations (_meta_registrations, _decomp, _refs, _prims) on the
    first meta operation; measured across the NAT lab, that was most of a first release's 1.1 s.
    """
    try:
        torch.empty(2, device="meta") * 2
    except Exception:  # pragma: no cover - only a warm-up
        log.debug("warming meta tensors failed", exc_info=True)
    finally:
        _warm_done.set()


class Owner:
    """A data owner's Duet: publish assets, watch requests, decide."""

    def __init__(
        self,
        name: str = "owner",
        approve: str = "auto",
        approve_joins: bool = False,
        audit_log: Optional[Path | str] = None,
        limits: Optional[Limits] = None,
        identity: Optional[identity_mod.Identity] = None,
        request_expiry: Optional[float] = 24 * 3600,
        resume_window: float = 600.0,
    ) -> None:
        if approve not in APPROVE_MODES:
            raise ValueError(f"approve must be one of {APPROVE_MODES}, not {approve!r}")
        self.name = name
        self.approve = approve
        self.approve_joins = approve_joins
        self.resume_window = resume_window  # how long a dropped scientist may come back to their objects
        self.limits = limits or Limits()
        self.identity = identity or identity_mod.Identity.load_or_create()
        path = Path(audit_log) if audit_log is not None else identity_mod.config_dir() / "audit.jsonl"
        self.audit = AuditLog(path)
        # The privacy ledger lives beside the audit log: one per owner, read back after a restart.
        self.privacy = Privacy(path.with_name(path.stem + ".privacy-ledger.jsonl"), self.audit)
        self.store = AssetStore()
        self.requests = RequestQueue(self.audit, default_expiry=request_expiry)
        self.requests.own_fingerprint = self.identity.fingerprint
        self.federation = FederationPolicy()  # which secure sums this owner takes part in (pin_federation)
        self.code: Optional[str] = None
        self._connections: List[ScientistConnection] = []
        # (scientist's chosen name, why) of pairings whose network path failed, newest last.
        self.connection_failures: List[Tuple[str, str]] = []
        self._budgets: Dict[str, Budget] = {}  # per identity key, shared by its sessions
        self._lock = threading.Lock()
        self._listeners: List[Callable[[], None]] = []
        self._closers: List[Callable[[], None]] = []
        self.closed = False
        self._expiry_timer: Any = None
        if request_expiry is not None:
            from .. import runtime

            self._expiry_interval = max(0.05, min(1.0, request_expiry / 4))
            runtime.call_soon(self._expire_tick)

    def _expire_tick(self) -> None:
        """Runs on the loop: deny requests past their expiry, then reschedule."""
        if self.closed:
            return
        try:
            self.requests.expire_due()
        except Exception:
            log.exception("expiring requests failed")
        from .. import runtime

        self._expiry_timer = runtime.loop().call_later(self._expiry_interval, self._expire_tick)

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def pin_federation(self, peers: Optional[List[str]] = None, min_owners: int = 2,
                       max_colluders: Optional[int] = None, exact: bool = False) -> FederationPolicy:
        """Which secure sums this owner takes part in: only with these other owners (key fingerprints;
        None: any), and only while at least `min_owners` owners take part (a scientist inventing
        owners to single one out meets the first; one whose federation shrinks meets the second).
        `max_colluders`: how many owners of a round may collude with the scientist (None: fewer than
        a third); rounds whose threshold t of n owners has 2t <= n + max_colluders are refused.
        `exact=True`: also take part in exact sums (without dp=). In an exact sum the scientist
        chooses what every other owner contributes and with which weight, so it can make the sum
        this owner's value alone; allow it only for a scientist you trust with your values' sum
        (without it, only sums where each owner noises its own contribution, dp=epsilon).
        Each contribution still needs approval, by hand or by a rule (`add_handler(secure_sum=True)`).

        Shared computations on secret shares (`duet.smpc`) use the same policy: an owner takes part
        only with `exact=True`, only with the `peers` given (the other owners and the dealer), and
        no rule decides a computation with a key that is not pinned (`min_owners` does not apply).
        """
        if isinstance(min_owners, bool) or not isinstance(min_owners, int) or min_owners < 2:
            raise ValueError("min_owners must be an int >= 2")
        if peers is not None and (isinstance(peers, str) or not all(isinstance(p, str) and p.startswith("SHA256:") for p in peers)):
            raise ValueError("peers must be key fingerprints (\"SHA256:...\")")
        self.federation = FederationPolicy(frozenset(peers) if peers is not None else None, min_owners, max_colluders,
                                           bool(exact))
        self.audit.append("federation_pinned", peers=sorted(peers) if peers is not None else None, min_owners=min_owners,
                          max_colluders=max_colluders, exact=bool(exact))
        return self.federation

    @property
    def scientists(self) -> List[ScientistConnection]:
        with self._lock:
            return [c for c in self._connections if c.state == ConnState.ACTIVE]

    def attach(self, session: Session, ctx: HandshakeContext) -> ScientistConnection:
        """Serve a scientist over an open session; the handshake then runs on messages."""
        if self.closed:
            raise ConnectionLost("this owner is closed")
        conn = ScientistConnection(self, session, ctx)
        with self._lock:
            self._connections.append(conn)
        return conn

    def record_connection_failure(self, scientist_name: str, message: str) -> None:
        """A scientist paired but no network route was found: keep it for the panel (the latest few)."""
        with self._lock:
            self.connection_failures.append((scientist_name, message))
            del self.connection_failures[:-CONNECTION_FAILURES_KEPT]
        self._changed()

    def wait_for_scientist(self, timeout: float = 60.0) -> ScientistConnection:
        """Block until at least one scientist has joined; for scripts and tests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.scientists
            if active:
                return active[0]
            self.requests.wait_changed(min(0.25, max(deadline - time.monotonic(), 0)))
        raise TimeoutError(f"no scientist joined within {timeout} s")

    def wait_for_scientists_to_leave(self, timeout: float = 3600.0) -> None:
        """Block until every scientist who joined has left (or their link dropped for good); for
        notebooks and scripts that serve one session and then close."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                live = [c for c in self._connections if c.state in LIVE]
            if not live:
                return
            self.requests.wait_changed(min(0.25, max(deadline - time.monotonic(), 0)))
        raise TimeoutError(f"scientists were still connected after {timeout} s")

    def sessions_of(self, fingerprint: str, besides: Optional[ScientistConnection] = None) -> int:
        """How many live sessions (active, joining or suspended) one identity key has."""
        with self._lock:
            return sum(
                1 for c in self._connections
                if c is not besides and c.requester is not None and c.requester.fingerprint == fingerprint
                and c.state in LIVE
            )

    def budget_of(self, fingerprint: str) -> Budget:
        """The object and byte budget all sessions of one identity key share."""
        with self._lock:
            budget = self._budgets.get(fingerprint)
            if budget is None:
                budget = self._budgets[fingerprint] = Budget()
            return budget

    @property
    def suspended(self) -> List[ScientistConnection]:
        """Scientists whose link dropped and who may still resume."""
        with self._lock:
            return [c for c in self._connections if c.state == ConnState.SUSPENDED]

    def _take_suspended(self, token: bytes, fingerprint: str) -> Optional[ScientistConnection]:
        with self._lock:
            for conn in self._connections:
                if (
                    conn.state == ConnState.SUSPENDED
                    and secrets.compare_digest(conn.resume_token, token)
                    and conn.requester is not None
                    and conn.requester.fingerprint == fingerprint
                ):
                    return conn if conn._to(ConnState.RESUMING) else None
        return None

    def _forget(self, conn: ScientistConnection) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        self._changed()

    def panel(self) -> Any:
        """The live owner panel (ipywidgets): the same object on every call."""
        from .. import views  # the ui layer sits above and registers its panel there

        if views.owner_panel is None:
            raise RuntimeError("the owner panel is not available (duet.widgets was not loaded)")
        return views.owner_panel(self)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call back whenever scientists join or leave."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self.requests._notify()
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:
                pass

    def close(self, reason: str = "the owner closed the session") -> None:
        """Tell every scientist why, close their links, and stop serving."""
        if self.closed:
            return
        self.closed = True
        from .. import runtime

        if self._expiry_timer is not None:
            runtime.call_soon(self._expiry_timer.cancel)
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.session.send({"t": Msg.BYE, "reason": reason})
            except ConnectionLost:
                pass
            try:
                runtime.run(conn.session.close(), timeout=5, what="closing a scientist link")
            except Exception:
                pass
        for req in self.requests.pending:
            try:
                self.requests.decide(req, Status.CANCELLED, by="system", reason=reason)
            except ValueError:
                pass
        for conn in conns:
            conn.stop_worker(timeout=10)
        for closer in self._closers:
            try:
                closer()
            except Exception:
                log.exception("error while closing")

    def _rows(self) -> List[List[Any]]:
        return [c.summary() for c in self.scientists]

    def __repr__(self) -> str:
        head = f"Duet owner {self.name!r} ({self.fingerprint})"
        if self.code:
            head += f"\njoin code: {self.code}\nscientists run: duet.join({self.code!r})"
        return "\n".join(
            [head, text_table(["scientist", "fingerprint", "state", "objects", "route"], self._rows(), title="Scientists"),
             repr(self.store), repr(self.requests)]
        )

    def _repr_html_(self) -> str:
        import html

        head = f"<p><b>Duet owner</b> {html.escape(self.name)} <code>{html.escape(self.fingerprint)}</code></p>"
        if self.code:
            head += f"<p>Scientists run: <code>duet.join({html.escape(repr(self.code))})</code></p>"
        return (
            head
            + html_table(["scientist", "fingerprint", "state", "objects", "route"], self._rows(), title="Scientists")
            + self.store._repr_html_()
            + self.requests._repr_html_()
        )
