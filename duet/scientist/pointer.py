"""Pointers: stand-ins for objects on the owner that never reveal values.

Every operation on a Pointer is sent to the owner at once (pipelined) and
returns a new Pointer. `bool`, `len`, `iter`, `float`, `int`, `index`,
`format` and `repr` refuse or describe, never read a value. The only way to
a value is `.get()`, which the owner must approve when the value derives from
private data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from .. import allowlist, containers
from ..errors import NotAllowed, NotAllowedHere
from ..protocol import Status
from . import devices
from ..wire import Ref

if TYPE_CHECKING:
    from .client import Scientist
    from .requests import RequestHandle

_METHODS = allowlist.all_method_names()
_ATTRIBUTES = allowlist.all_attribute_names()
# Metadata served by a round trip (and withheld by the owner when data dependent).
_META = {"shape", "dtype", "ndim", "requires_grad", "is_leaf"}


def _refuse(what: str) -> TypeError:
    return TypeError(
        f"{what} of a Pointer would reveal a value of the owner's data; "
        "use .get(reason=...) to ask the owner for it"
    )


class Pointer:
    """A reference to an object on the owner."""

    __slots__ = ("_client", "_rid", "_label", "_handle", "_dp_handle", "_kind", "_length", "__weakref__")

    if TYPE_CHECKING:  # the operators are installed below the class; these stubs tell type checkers
        def __add__(self, other: Any) -> "Pointer": ...
        def __radd__(self, other: Any) -> "Pointer": ...
        def __iadd__(self, other: Any) -> "Pointer": ...
        def __sub__(self, other: Any) -> "Pointer": ...
        def __rsub__(self, other: Any) -> "Pointer": ...
        def __isub__(self, other: Any) -> "Pointer": ...
        def __mul__(self, other: Any) -> "Pointer": ...
        def __rmul__(self, other: Any) -> "Pointer": ...
        def __imul__(self, other: Any) -> "Pointer": ...
        def __truediv__(self, other: Any) -> "Pointer": ...
        def __rtruediv__(self, other: Any) -> "Pointer": ...
        def __itruediv__(self, other: Any) -> "Pointer": ...
        def __floordiv__(self, other: Any) -> "Pointer": ...
        def __rfloordiv__(self, other: Any) -> "Pointer": ...
        def __ifloordiv__(self, other: Any) -> "Pointer": ...
        def __mod__(self, other: Any) -> "Pointer": ...
        def __rmod__(self, other: Any) -> "Pointer": ...
        def __imod__(self, other: Any) -> "Pointer": ...
        def __pow__(self, other: Any) -> "Pointer": ...
        def __rpow__(self, other: Any) -> "Pointer": ...
        def __ipow__(self, other: Any) -> "Pointer": ...
        def __matmul__(self, other: Any) -> "Pointer": ...
        def __rmatmul__(self, other: Any) -> "Pointer": ...
        def __imatmul__(self, other: Any) -> "Pointer": ...
        def __and__(self, other: Any) -> "Pointer": ...
        def __rand__(self, other: Any) -> "Pointer": ...
        def __iand__(self, other: Any) -> "Pointer": ...
        def __or__(self, other: Any) -> "Pointer": ...
        def __ror__(self, other: Any) -> "Pointer": ...
        def __ior__(self, other: Any) -> "Pointer": ...
        def __xor__(self, other: Any) -> "Pointer": ...
        def __rxor__(self, other: Any) -> "Pointer": ...
        def __ixor__(self, other: Any) -> "Pointer": ...
        def __lshift__(self, other: Any) -> "Pointer": ...
        def __rlshift__(self, other: Any) -> "Pointer": ...
        def __ilshift__(self, other: Any) -> "Pointer": ...
        def __rshift__(self, other: Any) -> "Pointer": ...
        def __rrshift__(self, other: Any) -> "Pointer": ...
        def __irshift__(self, other: Any) -> "Pointer": ...
        def __lt__(self, other: Any) -> "Pointer": ...
        def __le__(self, other: Any) -> "Pointer": ...
        def __gt__(self, other: Any) -> "Pointer": ...
        def __ge__(self, other: Any) -> "Pointer": ...
        def __eq__(self, other: Any) -> "Pointer": ...  # type: ignore[override]
        def __ne__(self, other: Any) -> "Pointer": ...  # type: ignore[override]
        def __neg__(self) -> "Pointer": ...
        def __pos__(self) -> "Pointer": ...
        def __abs__(self) -> "Pointer": ...
        def __invert__(self) -> "Pointer": ...
        def __getitem__(self, key: Any) -> "Pointer": ...

    def __init__(self, client: "Scientist", rid: int, label: str, kind: Optional[str] = None,
                 length: Optional[int] = None) -> None:
        self._client = client
        self._rid = rid
        self._label = label
        self._handle: Optional["RequestHandle"] = None
        self._dp_handle: Optional["RequestHandle"] = None  # the latest differentially private release
        # What is known here without asking the owner: the receiver kind of the allowlist
        # ("Tensor", "Module", ...) and, for a tuple or list result, its length.
        self._kind = kind
        self._length = length

    # -- identity -----------------------------------------------------------------
    @property
    def id(self) -> int:
        """The id this pointer's object has on the owner."""
        return self._rid

    def __repr__(self) -> str:
        return f"<Pointer #{self._rid}: {self._label}>"

    def __del__(self) -> None:
        try:
            self._client._free(self._rid)
        except Exception:
            pass

    __hash__ = object.__hash__

    # -- values leave only through requests ----------------------------------------
    def request(self, reason: str = "", dp: Optional[float] = None) -> "RequestHandle":
        """Ask the owner to release this value; returns at once with a handle.

        `dp=epsilon`: a differentially private release instead: noise from the owner's declared
        bounds, charged to your privacy budget (`scientist.privacy`); an owner rule may send it
        without a human decision. Each such request is a new noisy value and a new charge.
        """
        if dp is not None:
            return self._request_dp(reason, dp)
        handle = self._handle
        if handle is not None and not handle.delivered and handle.status != "failed":
            # e.g. a get() that timed out: wait for the same request, with the new reason if one is given
            if reason and reason != handle.reason and handle.status == Status.PENDING:
                self._client._amend_request(self, handle, reason)
            return handle
        self._handle = self._client._request_release(self, reason, decode=self._decoder())
        self._handle.progress_source = getattr(self._client.session, "transport", None)
        return self._handle

    def _request_dp(self, reason: str, epsilon: float) -> "RequestHandle":
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError("dp= takes epsilon, a number > 0 (smaller: more noise, less privacy spent)")
        handle = self._dp_handle
        if handle is not None and not handle.delivered and handle.status != "failed" and handle.dp == epsilon:
            return handle  # a timed-out get(dp=...): wait for the same request, charged once
        self._dp_handle = self._client._request_release(self, reason, dp=float(epsilon))
        self._dp_handle.progress_source = getattr(self._client.session, "transport", None)
        return self._dp_handle

    def _decoder(self) -> Optional[Callable[[Any], Any]]:
        """How a released value is decoded (None: as plain data); a sent model's pointer rebuilds the model."""
        return None

    def get(self, reason: str = "", timeout: Optional[float] = None, dp: Optional[float] = None) -> Any:
        """The value, once the owner approves (at once for values of your own).

        `dp=epsilon` asks for a differentially private release (see `request`); the handle's
        `.charge` (`pointer.request(dp=...).charge`) says what it cost.
        """
        return self.request(reason, dp=dp).wait(timeout)

    def meta(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Type, shape (when not data dependent), dtype, and lineage, from the owner."""
        return self._client._meta(self, timeout)

    @property
    def shape(self) -> Any:
        import torch

        meta = self.meta()
        if meta.get("metadata_private"):
            raise NotAllowed(
                "this shape depends on private values (for example a masked selection, or sizes computed "
                "from private data); request it with .size() and .get()"
            )
        if meta["shape"] is None:
            if meta["type"] not in ("Tensor", "ndarray"):
                raise AttributeError(f"a remote {meta['type']} has no shape")
            raise NotAllowed(
                "this shape depends on private values (for example a masked selection); "
                "request it with .size() and .get()"
            )
        return torch.Size(meta["shape"]) if meta["type"] == "Tensor" else tuple(meta["shape"])

    @property
    def dtype(self) -> Any:
        import numpy as np
        import torch

        meta = self.meta()
        if meta.get("metadata_private"):
            raise NotAllowed("this value's metadata depends on private values; request it with .get()")
        if meta["dtype"] is None:
            raise AttributeError(f"a remote {meta['type']} has no dtype")
        return getattr(torch, meta["dtype"]) if meta["type"] == "Tensor" else np.dtype(meta["dtype"])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def private(self) -> bool:
        """Whether the value derives from the owner's assets (and so needs approval)."""
        return bool(self.meta()["private"])

    # -- forwarding ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in devices.REFUSED_METHODS:
            raise NotAllowedHere(devices.REFUSED_METHODS[name])
        if name in _META:  # (shape and dtype are properties; the rest are in the metadata reply)
            raise AttributeError(f"read {name} of a remote value with .meta()[{name!r}]")
        kind = self._kind
        if kind is not None:  # refuse at the call site, as the owner would (it checks again)
            if name in allowlist.METHODS.get(kind, {}):
                return _RemoteMethod(self, name)
            if name in allowlist.ATTRIBUTES.get(kind, {}) and name not in _META:
                return self._client._call("attr", name, [self], {})
            raise NotAllowedHere(f"{kind}.{name} is not on the owner's allowlist{allowlist.alternative(kind, name)}")
        if name in _METHODS:  # (a name that is both, like `size`, is the tensor method)
            return _RemoteMethod(self, name)
        if name in _ATTRIBUTES and name not in _META:
            return self._client._call("attr", name, [self], {})
        raise AttributeError(f"{name!r} is not on the owner's allowlist for remote objects{allowlist.alternative('Tensor', name)}")

    def __call__(self, *args: Any, **kwargs: Any) -> "Pointer":
        return self._client._call("call", "forward", [self, *args], kwargs)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        client = next((a._client for a in _walk(args) if isinstance(a, Pointer)), None)
        if client is None:
            client = next((a._client for a in _walk(list((kwargs or {}).values())) if isinstance(a, Pointer)))
        return client._torch_function(func, args, kwargs or {})

    # -- what would read a value: refused ------------------------------------------
    def __bool__(self) -> bool:
        raise _refuse("the truth value")

    def __len__(self) -> int:
        raise _refuse("len()")

    def __iter__(self) -> Any:
        """Unpacking (`mu, logvar = model(x)`, `values, idx = x.max(dim=0)`): one pointer per item.

        The number of items is known here for a sent model's outputs, else asked of the owner, who
        tells it only when it does not depend on private values (like a shape).
        """
        length = self._length
        if length is None:
            meta = self.meta()
            length = meta.get("length")
            if length is None:
                if meta.get("metadata_private"):
                    raise NotAllowed("how many items this value has depends on private values; request it with .get()")
                raise _refuse("iterating")
        if length > MAX_UNPACK:
            raise NotAllowed(f"iterating would make {length} pointers (at most {MAX_UNPACK}); index the ones you need")
        return (self[i] for i in range(length))

    def __float__(self) -> float:
        raise _refuse("float()")

    def __int__(self) -> int:
        raise _refuse("int()")

    def __index__(self) -> int:
        raise _refuse("using as an index")

    def __complex__(self) -> complex:
        raise _refuse("complex()")

    def __format__(self, spec: str) -> str:
        if spec:
            raise _refuse("formatting")
        return repr(self)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a Pointer cannot be pickled; it is only meaningful in its session")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Pointer.__slots__:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(
                f"cannot set {name!r} on a remote object; use an in-place method (e.g. requires_grad_())"
            )

    def __setitem__(self, key: Any, value: Any) -> None:
        self._client._call("func", "operator.setitem", [self, key, value], {}, want_result=False)


class _RemoteMethod:
    """A method of a remote object, bound to its pointer.

    kind "call": another method of a sent model (`vae.decode`), whose output length is known.
    """

    __slots__ = ("_ptr", "_name", "_kind", "_length")

    def __init__(self, ptr: Pointer, name: str, kind: str = "method", length: Optional[int] = None) -> None:
        self._ptr = ptr
        self._name = name
        self._kind = kind
        self._length = length

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        name = self._name
        if self._kind == "call":
            return self._ptr._client._call("call", name, [self._ptr, *args], kwargs, length=self._length)
        if name == "to":
            args, kwargs = devices.without_cpu_device(tuple(args), dict(kwargs), "to")
            if not args and not kwargs:
                name = "cpu"  # .to("cpu"): what is left is a no-op the owner knows as cpu()
        kind = self._ptr._kind if name in ("cpu", "to") else None  # still the same kind of value
        return self._ptr._client._call("method", name, [self._ptr, *args], kwargs, result_kind=kind)

    def __repr__(self) -> str:
        return f"<remote method {self._name} of {self._ptr!r}>"


def _walk(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    else:
        yield obj


def _binary(op: str, reflected: bool = False) -> Any:
    name = f"operator.{op}"

    def forward(self: Pointer, other: Any) -> Pointer:
        args = [other, self] if reflected else [self, other]
        return self._client._call("func", name, args, {})

    forward.__name__ = f"__{'r' if reflected else ''}{op.rstrip('_')}__"
    return forward


def _unary(op: str) -> Any:
    name = f"operator.{op}"

    def forward(self: Pointer) -> Pointer:
        return self._client._call("func", name, [self], {})

    return forward


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift"):
    _py = _op.rstrip("_")
    setattr(Pointer, f"__{_py}__", _binary(_op))
    setattr(Pointer, f"__r{_py}__", _binary(_op, reflected=True))
    setattr(Pointer, f"__i{_py}__", _binary(f"i{_py}" if _op not in ("lshift", "rshift") else _op))
for _op in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(Pointer, f"__{_op}__", _binary(_op))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(Pointer, f"__{_op}__", _unary(_op))
setattr(Pointer, "__getitem__", _binary("getitem"))


MAX_ARG_DEPTH = containers.MAX_DEPTH
MAX_UNPACK = 100_000


@dataclass(frozen=True)
class RefErrors:
    """How a caller of `refs_in` words its refusals."""

    foreign: Callable[[], Exception]  # a pointer of another session (or outside a plan)
    too_deep: Callable[[], Exception]
    module_hint: str  # a local nn.Module passed where a pointer to one is needed


def refs_in(obj: Any, client: Any, errors: RefErrors) -> Any:
    """Arguments with every Pointer of `client` replaced by a wire Ref."""
    import torch

    def ref(obj: Any) -> Any:
        if isinstance(obj, Pointer):
            if obj._client is not client:
                raise errors.foreign()
            return Ref(obj._rid)
        if isinstance(obj, torch.nn.Module):
            raise TypeError(errors.module_hint)
        return obj

    return containers.map_leaves(obj, ref, max_depth=MAX_ARG_DEPTH, too_deep=errors.too_deep)
