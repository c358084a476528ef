"""The scientist's side of a Duet: pointers, remote namespaces, requests.

Result ids are allocated here and actions are sent without waiting, so work
pipelines; only `.get()`, listings and metadata make a round trip.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import threading
import weakref
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from .. import allowlist, identity as identity_mod, runtime, wire
from ..errors import ConnectionLost, NotAllowed, PairingError, ProtocolError, RequestDenied, RequestTimeout
from ..protocol import Msg, RequestKind, error_from_wire, problem
from ..session import Session
from ..tables import html_table, store_headers, store_rows, text_table
from . import devices
from .pointer import Pointer, RefErrors, refs_in
from .requests import RequestHandle, RequestList

log = logging.getLogger("duet.scientist")

DEFAULT_TIMEOUT = 30.0
_HASH_ALONGSIDE = 16 << 20  # release payloads from this size are checksummed while they are decoded
_ARG_ERRORS = RefErrors(
    foreign=lambda: ValueError("this pointer belongs to another Duet session"),
    too_deep=lambda: ProtocolError("arguments nested too deeply"),
    module_hint="send a module with scientist.send(module) first, then pass its pointer",
)
MAX_LABEL = 80
MAX_FAILURES_KEPT = 10_000
FREE_BATCH_SECONDS = 0.05  # dropped pointers are freed in batches, or with the next action


def _label(name: str, args: List[Any]) -> str:
    short = name.rsplit(".", 1)[-1]
    inner = next((a._label for a in args if isinstance(a, Pointer)), "")
    text = f"{short}({inner})"
    return text if len(text) <= MAX_LABEL else "…" + text[-(MAX_LABEL - 1):]


class _TorchNames:
    """Maps torch/numpy callables to their allowlisted names, for __torch_function__."""

    def __init__(self) -> None:
        self._by_id: Optional[Dict[int, tuple]] = None
        self._lock = threading.Lock()

    def lookup(self, func: Any) -> Optional[tuple]:
        with self._lock:
            if self._by_id is None:
                self._by_id = self._build()
        return self._by_id.get(id(func))

    @staticmethod
    def _build() -> Dict[int, tuple]:
        table: Dict[int, tuple] = {}
        for name in allowlist.FUNCTIONS:
            if name.startswith("torch."):
                obj = allowlist.import_dotted(name)
                if obj is not None:
                    table.setdefault(id(obj), ("func", name))
        for name in allowlist.TENSOR_METHODS:
            obj = getattr(torch.Tensor, name, None)
            if obj is not None:
                table.setdefault(id(obj), ("method", name))
        for name in allowlist.TENSOR_ATTRIBUTES:
            prop = getattr(torch.Tensor, name, None)
            getter = getattr(prop, "__get__", None)
            if getter is not None:
                table.setdefault(id(getter), ("attr", name))
        return table


_TORCH_NAMES = _TorchNames()
_PREFIXES = {".".join(n.split(".")[:i]) for n in allowlist.FUNCTIONS for i in range(1, n.count(".") + 1)}


def _constructed_kind(name: str) -> Optional[str]:
    """The receiver kind a constructor call makes (known without asking the owner), else None."""
    if name in allowlist.NN_MODULES:
        return "Module"
    if name in allowlist.OPTIMIZERS:
        return "Optimizer"
    if name in allowlist.LR_SCHEDULERS:
        return "LRScheduler"
    if name in allowlist.DISTRIBUTIONS:
        return "Distribution"
    return None


# Answered on the scientist's side: the owner computes on its CPU only (see duet.scientist.devices).
LOCAL_NAMES: Dict[str, Any] = {
    "torch.cuda.is_available": lambda: False,
    "torch.cuda.device_count": lambda: 0,
    "torch.backends.mps.is_available": lambda: False,
    "torch.device": torch.device,
}
_PREFIXES_LOCAL = {".".join(n.split(".")[:i]) for n in LOCAL_NAMES for i in range(1, n.count(".") + 1)}


class RemoteNamespace:
    """`scientist.torch.nn.Linear(3, 4)` builds a Linear on the owner and returns a Pointer."""

    def __init__(self, client: "Scientist", path: str) -> None:
        self._client = client
        self._path = path

    def __getattr__(self, name: str) -> "RemoteNamespace":
        if name.startswith("_"):
            raise AttributeError(name)
        path = f"{self._path}.{name}"
        if path in LOCAL_NAMES:
            return LOCAL_NAMES[path]
        if path in allowlist.FUNCTIONS or path in _PREFIXES or path in _PREFIXES_LOCAL:
            return RemoteNamespace(self._client, path)
        raise AttributeError(f"{path} is not on the owner's allowlist{allowlist.alternative('', path)}")

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        if self._path not in allowlist.FUNCTIONS:
            raise NotAllowed(f"{self._path} is not callable remotely")
        return self._client._call("func", self._path, list(args), kwargs)

    def __dir__(self) -> List[str]:
        depth = self._path.count(".") + 1
        names = {n.split(".")[depth] for n in allowlist.FUNCTIONS if n.startswith(self._path + ".")}
        return sorted(names)

    def __repr__(self) -> str:
        return f"<remote namespace {self._path}>"


class StoreView:
    """The owner's published assets, as the scientist sees them: descriptions, never values."""

    def __init__(self, client: "Scientist") -> None:
        self._client = client

    def listing(self, timeout: float = DEFAULT_TIMEOUT) -> List[Dict[str, Any]]:
        return self._client.session.call({"kind": RequestKind.STORE}, timeout, "listing the owner's store")

    def __getitem__(self, key: Any) -> Pointer:
        """An asset by its exact name, or by position in publication order (`store[0]`, `store[-1]`)."""
        if isinstance(key, int) and not isinstance(key, bool):
            names = self.keys()
            if not -len(names) <= key < len(names):
                raise IndexError(f"the owner published {len(names)} asset(s); there is no asset at position {key}")
            name = names[key]
        elif isinstance(key, str):
            name = key
        else:
            raise TypeError("assets are looked up by name or by position")
        client = self._client
        rid = client._new_rid()
        try:
            info = client.session.call({"kind": RequestKind.ASSET, "name": name, "rid": rid}, DEFAULT_TIMEOUT, f"pointing at {name!r}")
        except NotAllowed as exc:
            raise KeyError(str(exc)) from None
        info = info if isinstance(info, dict) else {}
        kind = info.get("type") if info.get("type") in ("Tensor", "ndarray") else None
        shape = info.get("shape")
        length = shape[0] if info.get("type") in ("list", "tuple") and isinstance(shape, list) and shape else None
        return Pointer(client, rid, name, kind=kind, length=length if isinstance(length, int) else None)

    def keys(self) -> List[str]:
        return [a["name"] for a in self.listing()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.listing())

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __repr__(self) -> str:
        return text_table(store_headers(listing := self.listing()), store_rows(listing), title="Owner's published assets")

    def _repr_html_(self) -> str:
        return html_table(store_headers(listing := self.listing()), store_rows(listing), title="Owner's published assets")


class Scientist:
    """A scientist's link to one owner."""

    def __init__(self, session: Session, name: str = "scientist", identity: Optional[identity_mod.Identity] = None) -> None:
        self.session = session
        self.name = name
        self.identity = identity or identity_mod.Identity.load_or_create()
        self.owner_fingerprint: Optional[str] = None
        self.owner_name: Optional[str] = None
        self.approve_mode: Optional[str] = None
        self.requests = RequestList()
        self.failures: Dict[int, BaseException] = {}
        self.store = StoreView(self)
        self.torch = RemoteNamespace(self, "torch")
        self.numpy = RemoteNamespace(self, "numpy")
        from .dp import DPNamespace

        self.dp = DPNamespace(self)  # differentially private statistics and training
        self._rids = itertools.count(1)
        self._to_free: List[int] = []
        self._free_timer_set = False
        self._free_lock = threading.Lock()
        self._handles: "weakref.WeakValueDictionary[int, RequestHandle]" = weakref.WeakValueDictionary()
        self._welcome: "concurrent.futures.Future[Dict[str, Any]]" = concurrent.futures.Future()
        self._bye_reason: Optional[str] = None
        self._orphan_errors: List[BaseException] = []
        self._he: Any = None  # scientist.he, made on first use
        self._early_queued: Dict[int, int] = {}
        self._handles_lock = threading.Lock()
        self._resume_token: Optional[bytes] = None
        self.resumed = False
        self._rejoin: Optional[Any] = None  # set by duet.join: pairs again with the same code
        self._closers: List[Any] = []
        self._recorder: Any = None  # a duet.plan being recorded on this session
        self._code: Any = None  # the join code, whose owner commitment every (re)handshake is checked against
        # What each message from the owner does (see duet.protocol).
        self._handlers: Dict[str, Any] = {
            Msg.FAILED: self._on_failed, Msg.QUEUED: self._on_queued, Msg.WELCOME: self._on_welcome,
            Msg.REJECTED: self._on_rejected, Msg.BYE: self._on_bye, Msg.PROGRESS: self._on_progress,
        }
        self._progress: Dict[int, Any] = {}  # request id -> callback(done, total), for long requests
        session.set_handler(self._on_message)
        session.on_close(self._on_close)

    # -- handshake -------------------------------------------------------------------
    def handshake(self, ctx: Any, timeout: float, reason: str = "", resume: Optional[bytes] = None, code: Any = None) -> None:
        """Prove our identity, and verify the owner's, bound to this session (and to the join code's owner)."""
        pub = self.identity.public_key
        self.owner_name = ctx.owner_name
        hello = {"t": Msg.HELLO, "pub": pub, "sig": self.identity.sign(ctx.transcript("scientist", pub)), "reason": reason}
        if resume is not None:
            hello["resume"] = resume
        self.session.send(hello)
        try:
            welcome = self._welcome.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(
                f"the owner did not let us in within {timeout} s (they may need to approve the join)"
            ) from None
        owner_pub, sig = welcome.get("pub"), welcome.get("sig")
        if not isinstance(owner_pub, bytes) or not isinstance(sig, bytes):
            raise PairingError("the owner's welcome is malformed")
        identity_mod.verify(owner_pub, ctx.transcript("owner", owner_pub), sig)
        if code is not None:
            code.check_owner(owner_pub)  # the owner who made the code, not whoever registered the room first
            self._code = code
        fingerprint = identity_mod.fingerprint(owner_pub)
        if resume is not None and fingerprint != self.owner_fingerprint:
            raise PairingError("a different owner answered the resume; refusing to continue")
        self.owner_fingerprint = fingerprint
        token = welcome.get("resume")
        self._resume_token = token if isinstance(token, bytes) else None
        self.resumed = bool(welcome.get("resumed"))
        self.approve_mode = welcome.get("approve") if isinstance(welcome.get("approve"), str) else None
        # The owner's identity is verified and bound to this channel: now the direct path may be offered.
        start_fast_path = getattr(self.session.transport, "start", None)
        if start_fast_path is not None:
            start_fast_path(ctx.fast_path_context())

    # -- inbound (runtime loop thread) ------------------------------------------------
    def _on_message(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == Msg.INVALID:
            log.warning("the owner sent a malformed message")
            return
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            log.warning("the owner sent an unknown message type %r", kind)
            return
        wrong = problem(msg)
        if wrong is not None:
            log.warning("the owner sent a malformed message: %s", wrong)
            if kind in (Msg.WELCOME, Msg.REJECTED) and not self._welcome.done():  # fail the handshake now
                self._welcome.set_exception(PairingError(f"the owner's {kind} is malformed: {wrong}"))
            return
        handler(msg)

    def _on_failed(self, msg: Dict[str, Any]) -> None:
        rid = msg.get("rid")
        exc = error_from_wire(msg.get("error"))
        if isinstance(rid, int):
            self.failures[rid] = exc
            if len(self.failures) > MAX_FAILURES_KEPT:
                self.failures.pop(next(iter(self.failures)))
        else:  # an action without a result: nothing to .get(), so ping() reports it
            self._orphan_errors.append(exc)
            del self._orphan_errors[:-100]
        log.warning("a remote operation failed: %s", exc)

    def _on_queued(self, msg: Dict[str, Any]) -> None:
        req_id, owner_id = msg.get("id"), msg.get("request")
        if isinstance(req_id, int) and isinstance(owner_id, int):
            with self._handles_lock:
                handle = self._handles.get(req_id)
                if handle is None:  # the notice beat the handle's registration
                    self._early_queued[req_id] = owner_id
                    while len(self._early_queued) > 1000:
                        self._early_queued.pop(next(iter(self._early_queued)))
            if handle is not None:
                self._note_queued(handle, owner_id)

    def _on_progress(self, msg: Dict[str, Any]) -> None:
        callback = self._progress.get(msg.get("id"))  # type: ignore[arg-type]
        done, total = msg.get("done"), msg.get("total")
        if callback is not None and isinstance(done, int) and isinstance(total, int):
            try:
                callback(done, total)
            except Exception:
                log.debug("a progress callback failed", exc_info=True)

    def _on_welcome(self, msg: Dict[str, Any]) -> None:
        if not self._welcome.done():
            self._welcome.set_result(msg)

    def _on_rejected(self, msg: Dict[str, Any]) -> None:
        if not self._welcome.done():
            self._welcome.set_exception(RequestDenied(str(msg.get("reason") or "the owner declined the join")))

    def _on_bye(self, msg: Dict[str, Any]) -> None:
        self._bye_reason = str(msg.get("reason") or "the owner left")
        if self.session.close_reason is None:
            self.session.close_reason = ConnectionLost(self._bye_reason)
        if not self._welcome.done():
            self._welcome.set_exception(ConnectionLost(self._bye_reason))

    def _on_close(self, reason: Optional[BaseException]) -> None:
        if not self._welcome.done():
            self._welcome.set_exception(ConnectionLost(f"the link closed during the handshake: {reason or 'closed'}"))

    # -- actions ----------------------------------------------------------------------
    def _new_rid(self) -> int:
        return next(self._rids)

    def _encode_args(self, obj: Any) -> Any:
        return refs_in(obj, self, _ARG_ERRORS)

    def _call(self, kind: str, name: str, args: List[Any], kwargs: Dict[str, Any], want_result: bool = True,
              result_kind: Optional[str] = None, length: Optional[int] = None) -> Any:
        if kind == "func" and name not in allowlist.FUNCTIONS:
            raise NotAllowed(f"{name} is not on the owner's allowlist{allowlist.alternative('', name)}")
        if "device" in kwargs:  # torch.zeros(3, device=device): the owner's CPU is the only device
            _, kwargs = devices.without_cpu_device((), kwargs, name)
        bad = allowlist.FORBIDDEN_KWARGS.intersection(kwargs)
        if bad:
            raise NotAllowed(f"keyword argument {sorted(bad)[0]!r} is not allowed remotely")
        recorder = self._recorder
        if recorder is not None and recorder.thread == threading.get_ident():  # inside a duet.plan recording
            return recorder._call(kind, name, args, kwargs, want_result, result_kind=result_kind, length=length)
        rid = self._new_rid() if want_result else None
        msg = {
            "t": Msg.CALL,
            "rid": rid,
            "kind": kind,
            "name": name,
            "args": self._encode_args(list(args)),
            "kwargs": self._encode_args(dict(kwargs)),
        }
        self._send_with_frees(msg)
        if rid is None:
            return None
        if result_kind is None and kind == "func":
            result_kind = _constructed_kind(name)
        return Pointer(self, rid, _label(name, list(args)), kind=result_kind, length=length)

    def _torch_function(self, func: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
        found = _TORCH_NAMES.lookup(func)
        if found is None:
            fname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise NotAllowed(f"torch function {fname} is not on the owner's allowlist")
        kind, name = found
        return self._call(kind, name, list(args), kwargs)

    def send(self, value: Any, methods: Optional[List[str]] = None) -> Pointer:
        """Upload your own tensor, array, numbers or model; its pointer needs no approval to read back.

        A model travels as graphs of its forward and of the other public methods its class defines
        (`methods=` names exactly which, and fails if one cannot be traced).
        """
        if isinstance(value, Pointer):
            raise TypeError("this is already a remote object")
        if methods is not None and not isinstance(value, torch.nn.Module):
            raise TypeError("methods= is for models")
        if isinstance(value, torch.nn.Module):
            from .models import ModelPointer, copy_module, describe

            template = copy_module(value)  # before anything is uploaded: a failure leaves nothing behind
            described = describe(value, methods)  # refuses a module with an off-list call, naming it
            rid = self._new_rid()
            self._send_with_frees({"t": Msg.MODEL, "rid": rid, "graph": described.graph})
            return ModelPointer(self, rid, f"model {type(value).__name__}", template, described)
        rid = self._new_rid()
        self._send_with_frees({"t": Msg.PUT, "rid": rid, "value": value})
        kind = "Tensor" if isinstance(value, torch.Tensor) else "ndarray" if isinstance(value, np.ndarray) else None
        length = len(value) if isinstance(value, (list, tuple)) else None
        return Pointer(self, rid, f"sent {type(value).__name__}", kind=kind, length=length)

    def loader(
        self, name: str, batch_size: int = 64, shuffle: bool = False, drop_last: bool = False,
        seed: Optional[int] = None, progress: bool = True,
    ) -> Any:
        """Iterate batches of a dataset the owner published; each `for` loop is one epoch of pointers."""
        from .loader import RemoteLoader

        return RemoteLoader(self, name, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, progress=progress)

    def _free(self, rid: int) -> None:
        """A pointer was dropped. Its id rides on the next action; idle, a timer sends it."""
        with self._free_lock:
            self._to_free.append(rid)
            need_timer = not self._free_timer_set
            self._free_timer_set = True
        if need_timer and not self.session.closed:
            runtime.call_soon(self._arm_free_timer)

    def _arm_free_timer(self) -> None:
        runtime.loop().call_later(FREE_BATCH_SECONDS, self._flush_frees)

    def _take_frees(self) -> List[int]:
        with self._free_lock:
            ids, self._to_free = self._to_free, []
            self._free_timer_set = False
        self.failures_drop(ids)
        return ids

    def _send_with_frees(self, msg: Dict[str, Any]) -> None:
        """Send an action carrying the ids freed since the last one, so the owner frees them first.

        No extra message per dropped pointer, and the object budget is
        released before new objects arrive.
        """
        if self._to_free:
            ids = self._take_frees()
            if ids:
                msg["free"] = ids
        self.session.send(msg)

    def _flush_frees(self) -> None:
        ids = self._take_frees()
        if ids and not self.session.closed:
            try:
                self.session.send({"t": Msg.FREE, "ids": ids})
            except ConnectionLost:
                pass

    def failures_drop(self, ids: List[int]) -> None:
        for rid in ids:
            self.failures.pop(rid, None)

    # -- round trips --------------------------------------------------------------------
    def _check_failed(self, ptr: Pointer) -> None:
        exc = self.failures.get(ptr._rid)
        if exc is not None:
            raise exc

    def _meta(self, ptr: Pointer, timeout: Optional[float]) -> Dict[str, Any]:
        self._check_failed(ptr)
        return self.session.call({"kind": RequestKind.META, "obj": ptr._rid}, timeout or DEFAULT_TIMEOUT, f"metadata of {ptr!r}")

    def _request_release(self, ptr: Pointer, reason: str, decode: Any = None, dp: Optional[float] = None) -> RequestHandle:
        self._check_failed(ptr)
        if not isinstance(reason, str):
            raise TypeError("reason must be a string")
        msg: Dict[str, Any] = {"kind": RequestKind.RELEASE, "obj": ptr._rid, "reason": reason}
        if dp is not None:
            msg["dp"] = float(dp)
        fut = self.session.request(msg)
        handle = RequestHandle(ptr._label, reason, fut, decode or self._decode_release, dp=dp)
        with self._handles_lock:
            self._handles[fut.request_id] = handle  # type: ignore[attr-defined]
            early = self._early_queued.pop(fut.request_id, None)  # type: ignore[attr-defined]
        if early is not None:
            self._note_queued(handle, early)
        self.requests.append(handle)
        return handle

    def _amend_request(self, ptr: Pointer, handle: RequestHandle, reason: str) -> None:
        """A new reason for a release that is still waiting: the owner shows it on the same request.

        One-way: if the owner decided meanwhile, the decision stands and arrives as usual.
        """
        if not isinstance(reason, str):
            raise TypeError("reason must be a string")
        self._send_with_frees({"t": Msg.REASON, "obj": ptr._rid, "reason": reason})
        handle.reason = reason
        if handle.on_change is not None:
            handle.on_change(handle)

    @staticmethod
    def _note_queued(handle: RequestHandle, owner_request_id: int) -> None:
        handle.owner_request_id = owner_request_id
        if handle.on_change is not None:
            handle.on_change(handle)

    @staticmethod
    def _decode_release(raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("encoded"), (bytes, memoryview)):
            raise ProtocolError("malformed release from the owner")
        payload = raw["encoded"]  # a memoryview into the received message when it is large
        if len(payload) < _HASH_ALONGSIDE:
            if hashlib.sha256(payload).hexdigest() != raw.get("sha256"):
                raise ProtocolError("the released value does not match its checksum")
            return wire.decode(payload, borrow=True, adopt=True)
        # Large: hash on a second thread while decoding (both release the GIL); the value is
        # returned only if the checksum matches.
        digest: List[str] = []
        hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(payload).hexdigest()),
                                  name="duet-release-checksum", daemon=True)
        hasher.start()
        try:
            value = wire.decode(payload, borrow=True, adopt=True)  # a view of the payload, when it can be
        finally:
            hasher.join()
        if digest != [raw.get("sha256")]:
            raise ProtocolError("the released value does not match its checksum")
        return value

    def ping(self, timeout: float = DEFAULT_TIMEOUT) -> float:
        """Round-trip time to the owner in seconds; also a barrier after pipelined actions.

        Raises the first error of an earlier action that had no result to carry
        it (e.g. one refused because too many actions were queued).
        """
        import time

        self._flush_frees()
        start = time.perf_counter()
        self.session.call({"kind": RequestKind.PING}, timeout, "ping")
        elapsed = time.perf_counter() - start
        if self._orphan_errors:
            first, self._orphan_errors = self._orphan_errors[0], []
            raise first
        return elapsed

    @property
    def he(self) -> Any:
        """Homomorphic encryption with this owner (`duet.scientist.he.HE`): `self.he.context()` makes
        keys here and gives the owner the public part; encrypt, send, compute, get, decrypt."""
        if self._he is None:
            from .he import HE

            self._he = HE(self)
        return self._he

    @property
    def privacy(self) -> Any:
        """Your privacy budget with this owner: spent, left, and each differentially private release."""
        from .dp import privacy_of

        return privacy_of(self, DEFAULT_TIMEOUT)

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def connection(self) -> Any:
        """How this link reaches the owner: direct or relayed, candidate types, protocol, and rtt (one ping)."""
        import dataclasses

        from ..transport.route import Route

        transport = getattr(self.session, "transport", None)
        route = getattr(transport, "route", None) if transport is not None and hasattr(type(transport), "route") \
            else Route(kind="in-process")
        if route is None:
            route = Route(kind="direct")  # open, but no nominated pair to read
        if self.session.closed:
            return route
        try:
            return dataclasses.replace(route, rtt=self.ping(timeout=5.0))
        except Exception:
            return route

    @property
    def connected(self) -> bool:
        return not self.session.closed

    def resume(self, timeout: float = 30.0) -> "Scientist":
        """After a dropped link: pair again with the same code and identity, and carry on.

        Remote objects, pending requests and decisions made meanwhile are
        still there, until the owner's resume window passes. `.get()` calls
        that failed on the drop can simply be called again.
        """
        if not self.session.closed:
            return self
        if self._rejoin is None or self._resume_token is None:
            raise ConnectionLost("this session cannot be resumed (only sessions made with duet.join can)")
        session, ctx, closer = self._rejoin(timeout)
        self.session = session
        self._welcome = concurrent.futures.Future()
        self._bye_reason = None
        session.set_handler(self._on_message)
        session.on_close(self._on_close)
        self._closers = [closer]
        try:
            self.handshake(ctx, timeout, resume=self._resume_token, code=self._code)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Leave the session; the owner frees everything of ours."""
        if not self.session.closed:
            try:
                self.session.send({"t": Msg.LEAVE})
            except ConnectionLost:
                pass
            try:
                runtime.run(self.session.close(), timeout=10, what="closing the link")
            except Exception:
                pass
        for closer in self._closers:
            try:
                closer()
            except Exception:
                log.exception("error while closing")

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"closed ({self._bye_reason or 'link closed'})"
        return f"<Duet scientist {self.name!r} → owner {self.owner_name!r} ({self.owner_fingerprint}), {state}>"

    def __enter__(self) -> "Scientist":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
