"""Wire codec: the only place where bytes from a peer become Python objects.

Every message is one msgpack value. Plain msgpack carries the JSON-like core;
everything else travels as a msgpack *ext* whose payload is itself msgpack with
a fixed layout. There is no pickle, no eval and no class lookup by name: the
decoder builds only the types below, checks every field, and raises
:class:`~duet.errors.ProtocolError` (and nothing else) for anything outside
this schema or over the :class:`Limits`.

=================  ====  ===================================================
Python value       ext   wire form (ext payload is msgpack)
=================  ====  ===================================================
None/bool/float    --    msgpack nil / bool / float64 (NaN and inf kept)
int                --    msgpack int, -2**63 .. 2**64-1
str / bytes        --    msgpack str (UTF-8) / bin
Encoded            --    msgpack bin of that encoded message (encode only; decodes as bytes)
list               --    msgpack array
dict               --    msgpack map; keys str or int only
tuple              1     msgpack array [ext 1 (empty marker), item, ...]
torch.Tensor       2     [dtype, shape, requires_grad, bin little-endian]
numpy.ndarray      3     [dtype, shape, bin little-endian]
numpy scalar       4     [dtype, bin little-endian] (np.float32(1), ...)
complex            5     [real, imag]
slice              6     [start, stop, step], each nil or int64
Ellipsis           7     nil
torch.dtype        8     dtype name, e.g. "float32"
torch.Size         9     [int64, ...] (at most max_ndim entries)
numpy.dtype        10    dtype name
Ref                11    object id, 0 .. 2**63-1
pandas frame       12    array [ext 12 (empty marker), kind, ...]: see duet.wire_frames
Ciphertext         13    [kind, context digest, [part, ...], [size, ...]]: see duet.ciphertext
=================  ====  ===================================================

dtype names: bool uint8 int8 int16 int32 int64 float16 float32 float64
complex64 complex128, plus bfloat16 for torch only. ``shape`` is a list of
non-negative ints whose product (zero dims counted as 1) times the itemsize
fits in int64 (so no stride computation can overflow), and
``prod(shape) * itemsize`` must equal the data length exactly. Bool data must
be 0/1 bytes; ``requires_grad`` may be true only for floating/complex dtypes.
Decoded arrays and tensors are fresh, writable, and own their memory.

Tuples are the only container ext, and they are *not* nested ext payloads: an
array that starts with the empty tuple marker. So decoding never re-enters
msgpack (a nested ext costs ~40 KB of C stack per level, and a copy of every
tensor inside the tuple per level), and the depth of anything is msgpack's own.

Depth counts list, dict and tuple levels (a top-level list is depth 1); the
other ext values are leaves with a fixed layout. ``max_items`` counts the
elements of every list, tuple and dict (one per entry) in the message.
:func:`encode` enforces the same limits as :func:`decode`, so whatever one side
encodes with some ``Limits`` the other side decodes with the same ``Limits``.
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import msgpack
import numpy as np
import torch

from duet import ciphertext, wire_frames, wire_scan
from duet.ciphertext import Ciphertext
from duet.errors import ProtocolError

__all__ = ["Ref", "Limits", "DEFAULT_LIMITS", "Encoded", "encode", "encode_parts", "decode"]


@dataclass(frozen=True)
class Ref:
    """Reference to an object on the owner, by the id the scientist allocated."""

    id: int


@dataclass(frozen=True)
class Limits:
    """Bounds on one message, so a hostile peer cannot exhaust memory, stack or time."""

    max_message_bytes: int = 512 * 2**20
    max_depth: int = 32  # nesting of containers (lists/dicts/tuples); a top-level list is 1
    max_items: int = 1_000_000  # total container elements in one message
    max_str_bytes: int = 1 * 2**20
    max_ndim: int = 16

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_depth", "max_items", "max_str_bytes", "max_ndim"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int")


DEFAULT_LIMITS = Limits()

# ---------------------------------------------------------------------------
# Schema tables

EXT_TUPLE = 1  # empty marker, first element of the array that holds the tuple's items
EXT_TENSOR = 2
EXT_NDARRAY = 3
EXT_NPSCALAR = 4
EXT_COMPLEX = 5
EXT_SLICE = 6
EXT_ELLIPSIS = 7
EXT_TORCH_DTYPE = 8
EXT_TORCH_SIZE = 9
EXT_NP_DTYPE = 10
EXT_REF = 11
EXT_FRAME = 12  # empty marker, first element of the array that holds a DataFrame or Series
EXT_CIPHERTEXT = 13

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_LITTLE = sys.byteorder == "little"

_NP_NAMES = (
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "complex64", "complex128",
)
_TORCH_NAMES = _NP_NAMES + ("bfloat16",)

_NP_DTYPE: dict[str, np.dtype] = {n: np.dtype(n) for n in _NP_NAMES}
# Lookup by dtype equality, so aliases (np.longlong vs np.int64) map to one name.
_NP_NAME_BY_DTYPE: dict[np.dtype, str] = {dt: n for n, dt in _NP_DTYPE.items()}
_NP_SCALAR_NAME: dict[type, str] = {dt.type: n for n, dt in _NP_DTYPE.items()}
_NP_DTYPE_CLASSES = frozenset(type(dt) for dt in _NP_DTYPE.values())

_TORCH_DTYPE: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _TORCH_NAMES}
_TORCH_NAME: dict[torch.dtype, str] = {dt: n for n, dt in _TORCH_DTYPE.items()}
_TORCH_GRAD_OK = frozenset(dt for dt in _TORCH_DTYPE.values() if dt.is_floating_point or dt.is_complex)
_ITEMSIZE: dict[str, int] = {n: torch.empty((), dtype=dt).element_size() for n, dt in _TORCH_DTYPE.items()}

_SCALARS = frozenset({type(None), bool, int, float, bytes})  # packed by msgpack as is
_PLAIN = _SCALARS | {str}
_BIG_BYTES = 1 << 16  # bytes this long go out as a bin header plus the object itself, not a msgpack copy
_CONTAINERS = frozenset({list, dict, tuple})
_KEY_TYPES = frozenset({str, int})
_EXT_LEAVES = frozenset(
    {torch.Tensor, np.ndarray, complex, slice, type(Ellipsis), torch.dtype, torch.Size, Ref, Ciphertext}
) | frozenset(_NP_SCALAR_NAME) | _NP_DTYPE_CLASSES
_DECODED = _PLAIN | _CONTAINERS | _EXT_LEAVES
_DECODED_BORROWED = _DECODED | {memoryview}  # decode(borrow=True): large bins are views
BORROW_MIN = 1 << 20  # decode(borrow=True) views bins and reads tensors in place from this size

_TUPLE_MARK_BYTES = b"\xc7\x00\x01"  # ext8, length 0, type 1
_FRAME_MARK_BYTES = b"\xc7\x00\x0c"  # ext8, length 0, type 12


class _TupleMark:
    """What the tuple marker decodes to; list_hook turns [mark, *items] into a tuple."""

    __slots__ = ()


_TUPLE_MARK = _TupleMark()


class _FrameMark:
    """What the frame marker decodes to; list_hook turns [mark, *items] into a DataFrame or Series."""

    __slots__ = ()


_FRAME_MARK = _FrameMark()

_FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}

Buffer = Union[bytes, bytearray, memoryview]


def _type_name(t: type) -> str:
    """Name a type for an error message without touching the value (values may be private)."""
    mod = getattr(t, "__module__", "") or ""
    qual = str(getattr(t, "__qualname__", None) or getattr(t, "__name__", "?"))
    return qual if mod == "builtins" else f"{mod}.{qual}"


# ---------------------------------------------------------------------------
# msgpack framing we write by hand, so big buffers are copied once (at the join)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xdd" + n.to_bytes(4, "big")
    raise ProtocolError("array too long to encode")


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xdf" + n.to_bytes(4, "big")
    raise ProtocolError("map too long to encode")


def _has_big_bytes(values: Any) -> bool:
    return any(type(v) is bytes and len(v) > _BIG_BYTES for v in values)


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 2**32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ProtocolError("binary payload too large to encode (4 GiB msgpack limit)")


def _ext_header(code: int, n: int) -> bytes:
    tag = _FIXEXT.get(n)
    if tag is not None:
        return bytes((tag, code))
    if n < 0x100:
        return b"\xc7" + n.to_bytes(1, "big") + bytes((code,))
    if n < 0x10000:
        return b"\xc8" + n.to_bytes(2, "big") + bytes((code,))
    if n < 2**32:
        return b"\xc9" + n.to_bytes(4, "big") + bytes((code,))
    raise ProtocolError("ext payload too large to encode (4 GiB msgpack limit)")


def _tensor_bytes(t: torch.Tensor, keep: list) -> memoryview:
    """A flat little-endian byte view of a contiguous CPU tensor, without copying.

    ``Tensor.numpy()`` would do, but it permanently marks the caller's storage as
    not resizable; reading through the data pointer has no side effect. ``keep``
    holds the tensor (possibly a temporary) alive until the message is joined.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    if not _LITTLE and t.element_size() > 1:
        return _raw_bytes(t.clone().numpy())
    keep.append(t)
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _raw_bytes(arr: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array in little-endian order (copies only on big-endian hosts)."""
    if not _LITTLE and arr.dtype.itemsize > 1:
        arr = arr.byteswap()  # numpy swaps complex components separately, as the wire wants
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # an ndarray is a buffer


# ---------------------------------------------------------------------------
# Encoder


class _Encoder:
    """One encode call: appends bytes chunks to lists, checks limits as it goes."""

    __slots__ = ("limits", "pack", "items", "keep", "views", "frames")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.keep: list = []  # tensors whose memory the output chunks point into
        self.views: list = []  # (chunk, tensor or array): chunks that view the caller's memory, not a copy of ours
        # strict_types: subclasses (np.float64, IntEnum, OrderedDict...) are not silently
        # packed as their base type; our own dispatch decides about them.
        self.pack: Callable[[Any], bytes] = msgpack.Packer(
            use_bin_type=True, strict_types=True, autoreset=True, datetime=False
        ).pack
        self.items = 0
        self.frames = 0

    def check_str(self, s: str) -> None:
        limit = self.limits.max_str_bytes
        if len(s) * 4 > limit and len(s.encode("utf-8")) > limit:
            raise ProtocolError(f"string longer than max_str_bytes={limit}")

    def check_strs(self, values: Any) -> None:
        limit = self.limits.max_str_bytes
        quick = limit // 4
        for s in values:
            if type(s) is str and len(s) > quick:
                self.check_str(s)

    def value(self, obj: Any, out: list, depth: int) -> None:
        t = type(obj)
        if t in _CONTAINERS:
            self.container(obj, t, out, depth + 1)
        elif t is str:
            self.check_str(obj)
            out.append(self.pack(obj))
        elif t is bytes and len(obj) > _BIG_BYTES:
            out.append(_bin_header(len(obj)))
            out.append(obj)
        elif t is Encoded:  # an encoded message inside this one: a bin of its bytes, its buffers not copied
            out.append(_bin_header(obj.size))
            out.extend(obj.parts)
            self.keep.append(obj)
            self.views.extend(obj.views)
        elif t in _SCALARS:
            out.append(self.pack(obj))
        else:
            enc = _EXT_ENCODERS.get(t)
            if enc is None:
                if isinstance(obj, np.generic):
                    enc = _enc_np_scalar
                elif isinstance(obj, np.dtype):
                    enc = _enc_np_dtype
                elif wire_frames.is_frame_type(t):
                    self.frame(obj, out, depth)
                    return
                else:
                    raise ProtocolError(f"cannot encode {_type_name(t)}")
            code, payload = enc(self, obj)
            out.append(_ext_header(code, sum(map(len, payload))))
            out.extend(payload)

    def frame(self, obj: Any, out: list, depth: int) -> None:
        """A DataFrame or Series: an array [frame marker, *items], counted like a tuple of its items."""
        if depth + 1 > self.limits.max_depth:
            raise ProtocolError(f"nesting deeper than max_depth={self.limits.max_depth}")
        items = wire_frames.to_items(obj)
        self.frames += wire_frames.units(items)  # the frame and each column
        if self.frames > wire_frames.MAX_COLUMNS:
            raise ProtocolError(f"more DataFrames, Series and columns in one message than {wire_frames.MAX_COLUMNS} "
                                f"units ({wire_frames.FRAME_UNITS} per frame, 1 per column)")
        self.items += len(items)
        if self.items > self.limits.max_items:
            raise ProtocolError(f"more than max_items={self.limits.max_items} container elements")
        if len(items) == 4 and len(obj) > self.limits.max_items:
            raise ProtocolError("a DataFrame without columns may have at most max_items rows")
        out.append(_array_header(len(items) + 1))
        out.append(_FRAME_MARK_BYTES)
        for v in items:
            self.value(v, out, depth + 1)

    def container(self, obj: Any, t: type, out: list, depth: int) -> None:
        lim = self.limits
        if depth > lim.max_depth:
            raise ProtocolError(f"nesting deeper than max_depth={lim.max_depth}")
        n = len(obj)
        self.items += n
        if self.items > lim.max_items:
            raise ProtocolError(f"more than max_items={lim.max_items} container elements")
        if t is dict:
            key_types = set(map(type, obj))
            if not key_types <= _KEY_TYPES:
                bad = sorted(_type_name(k) for k in key_types - _KEY_TYPES)
                raise ProtocolError(f"dict keys must be str or int, not {', '.join(bad)}")
            if str in key_types:
                self.check_strs(obj)
            vtypes = set(map(type, obj.values()))
            if vtypes <= _PLAIN and not (bytes in vtypes and _has_big_bytes(obj.values())):
                if str in vtypes:
                    self.check_strs(obj.values())
                out.append(self.pack(obj))
                return
            out.append(_map_header(n))
            for k, v in obj.items():
                out.append(self.pack(k))
                self.value(v, out, depth)
            return
        # list, or tuple = array [tuple marker, *items]
        vtypes = set(map(type, obj))
        if vtypes <= _PLAIN and not (bytes in vtypes and _has_big_bytes(obj)):
            if str in vtypes:
                self.check_strs(obj)
            if t is list:
                out.append(self.pack(obj))
            else:
                packed = self.pack(list(obj))
                skip = 1 if packed[0] < 0xDC else 3 if packed[0] == 0xDC else 5
                out.append(_array_header(n + 1))
                out.append(_TUPLE_MARK_BYTES)
                out.append(memoryview(packed)[skip:])
            return
        if t is list:
            out.append(_array_header(n))
        else:
            out.append(_array_header(n + 1))
            out.append(_TUPLE_MARK_BYTES)
        for v in obj:
            self.value(v, out, depth)


def _enc_tensor(enc: _Encoder, t: torch.Tensor) -> tuple[int, list]:
    if t.layout != torch.strided or t.is_sparse or t.is_nested:
        raise ProtocolError(f"cannot encode tensor with layout {t.layout}")
    if t.is_quantized:
        raise ProtocolError("cannot encode quantized tensor")
    if t.device.type != "cpu":
        raise ProtocolError(f"cannot encode tensor on device {t.device.type}")
    name = _TORCH_NAME.get(t.dtype)
    if name is None:
        raise ProtocolError(f"cannot encode tensor of dtype {t.dtype}")
    if t.dim() > enc.limits.max_ndim:
        raise ProtocolError(f"tensor has more than max_ndim={enc.limits.max_ndim} dims")
    requires_grad = bool(t.requires_grad)
    t = t.detach()
    copied = False  # whether `t` is now a copy of ours rather than the caller's memory
    if t.is_conj():
        t, copied = t.resolve_conj(), True
    if t.is_neg():
        t, copied = t.resolve_neg(), True
    if not t.is_contiguous():
        t, copied = t.contiguous(), True
    if name == "bfloat16":  # numpy has no bfloat16; same bits as int16
        t = t.view(torch.int16)
    data = _tensor_bytes(t, enc.keep)
    if not copied and len(data):
        enc.views.append((data, t))
    head = b"\x94" + enc.pack(name) + enc.pack(list(t.shape)) + enc.pack(requires_grad)
    return EXT_TENSOR, [head + _bin_header(len(data)), data]


def _enc_ndarray(enc: _Encoder, a: np.ndarray) -> tuple[int, list]:
    dt = a.dtype
    name = _NP_NAME_BY_DTYPE.get(dt)
    copied = False  # whether `a` is now a copy of ours rather than the caller's memory
    if name is None and dt.fields is None and dt.subdtype is None and not dt.isnative:
        name = _NP_NAME_BY_DTYPE.get(dt.newbyteorder("="))
        if name is not None:
            a, copied = a.astype(_NP_DTYPE[name], order="C"), True  # non-native byte order: one conversion copy
    if name is None or dt.fields is not None or dt.subdtype is not None:
        raise ProtocolError(f"cannot encode numpy array of dtype {dt.str}")
    if a.ndim > enc.limits.max_ndim:
        raise ProtocolError(f"array has more than max_ndim={enc.limits.max_ndim} dims")
    if not a.flags.c_contiguous:
        a, copied = a.copy(order="C"), True
    data = _raw_bytes(a)
    if not copied and len(data):
        enc.views.append((data, a))
    head = b"\x93" + enc.pack(name) + enc.pack(list(a.shape))
    return EXT_NDARRAY, [head + _bin_header(len(data)), data]


def _enc_np_scalar(enc: _Encoder, x: np.generic) -> tuple[int, list]:
    name = _NP_SCALAR_NAME.get(type(x)) or _NP_NAME_BY_DTYPE.get(x.dtype)
    if name is None:
        raise ProtocolError(f"cannot encode {_type_name(type(x))}")
    data = np.asarray(x, dtype=_NP_DTYPE[name]).astype(_NP_DTYPE[name].newbyteorder("<")).tobytes()
    return EXT_NPSCALAR, [enc.pack([name, data])]


def _check_i64(v: object, what: str) -> None:
    if type(v) is not int or not _I64_MIN <= v <= _I64_MAX:
        raise ProtocolError(f"{what} must be an int in the int64 range")


def _enc_complex(enc: _Encoder, c: complex) -> tuple[int, list]:
    return EXT_COMPLEX, [enc.pack([c.real, c.imag])]


def _enc_slice(enc: _Encoder, s: slice) -> tuple[int, list]:
    parts = [s.start, s.stop, s.step]
    for p in parts:
        if p is not None:
            _check_i64(p, "slice start/stop/step")
    return EXT_SLICE, [enc.pack(parts)]


def _enc_ellipsis(enc: _Encoder, e: object) -> tuple[int, list]:
    return EXT_ELLIPSIS, [b"\xc0"]


def _enc_torch_dtype(enc: _Encoder, dt: torch.dtype) -> tuple[int, list]:
    name = _TORCH_NAME.get(dt)
    if name is None:
        raise ProtocolError(f"cannot encode dtype {dt}")
    return EXT_TORCH_DTYPE, [enc.pack(name)]


def _enc_torch_size(enc: _Encoder, s: torch.Size) -> tuple[int, list]:
    dims = list(s)
    if len(dims) > enc.limits.max_ndim:
        raise ProtocolError(f"torch.Size has more than max_ndim={enc.limits.max_ndim} dims")
    for d in dims:
        _check_i64(d, "torch.Size entry")
    return EXT_TORCH_SIZE, [enc.pack(dims)]


def _enc_np_dtype(enc: _Encoder, dt: np.dtype) -> tuple[int, list]:
    name = _NP_NAME_BY_DTYPE.get(dt)
    if name is None or dt.fields is not None or dt.subdtype is not None:
        raise ProtocolError(f"cannot encode numpy dtype {dt.str}")
    return EXT_NP_DTYPE, [enc.pack(name)]


def _enc_ref(enc: _Encoder, r: Ref) -> tuple[int, list]:
    if type(r.id) is not int or not 0 <= r.id <= _I64_MAX:
        raise ProtocolError("Ref.id must be an int in 0 .. 2**63-1")
    return EXT_REF, [enc.pack(r.id)]


_EXT_ENCODERS: dict[type, Callable[[_Encoder, Any], tuple[int, list]]] = {
    torch.Tensor: _enc_tensor,
    torch.nn.Parameter: _enc_tensor,  # travels as its data and requires_grad flag
    np.ndarray: _enc_ndarray,
    complex: _enc_complex,
    slice: _enc_slice,
    type(Ellipsis): _enc_ellipsis,
    torch.dtype: _enc_torch_dtype,
    torch.Size: _enc_torch_size,
    Ref: _enc_ref,
    Ciphertext: lambda enc, c: _enc_ciphertext(enc, c),
}
_EXT_ENCODERS.update({t: _enc_np_scalar for t in _NP_SCALAR_NAME})
_EXT_ENCODERS.update({t: _enc_np_dtype for t in _NP_DTYPE_CLASSES})


def _copy_of(holder: Any, keep: list) -> memoryview:
    """The bytes of a tensor or array the encoder viewed, from a copy of ours (kept alive in `keep`).

    Copied by torch: on several threads, into memory allocated without transparent huge pages
    (see duet.transport.fastpath._message_buffer); 256 MiB in 60-90 ms here, against 130 ms for
    bytes() and 45-600 ms for a numpy copy.
    """
    if isinstance(holder, np.ndarray):
        if not holder.flags.writeable:  # torch.from_numpy would warn
            return _raw_bytes(holder.copy())
        holder = torch.from_numpy(holder)
    return _tensor_bytes(holder.clone(memory_format=torch.contiguous_format), keep)


class Encoded:
    """One encoded message as a list of buffers, not yet joined into one bytes object.

    A transport that can send buffers one after another (the fast path) sends a large
    tensor's memory as it is; an ``Encoded`` inside another message encodes as a msgpack
    bin of these bytes without copying them. ``keep`` holds the tensors the buffers point
    into alive for as long as this object lives.

    ``views`` are the (buffer, tensor or array) pairs whose buffer is the caller's own memory,
    which the caller may write again; empty when encoded with ``owned=True``. Whoever keeps the
    buffers beyond the call that was given them (a transport that sends later) keeps
    :meth:`owned` instead, so what goes out is the value as it was when it was sent.
    """

    __slots__ = ("parts", "size", "_keep", "views")

    def __init__(self, parts: list, keep: list, views: Sequence[tuple] = ()) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))
        self._keep = keep
        self.views = tuple(views)

    def owned(self) -> "Encoded":
        """This message with its own copy of the caller's memory it views: itself when it views none.

        One copy of those buffers (of nothing, for a value encoded with ``owned=True``); the caller
        may change its tensors and arrays afterwards without changing this message.
        """
        if not self.views:
            return self
        held = {id(holder) for _, holder in self.views}
        keep = [k for k in self._keep if id(k) not in held]
        copies = {id(view): _copy_of(holder, keep) for view, holder in self.views}
        return Encoded([copies.get(id(p), p) for p in self.parts], keep)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Encoded({self.size} bytes in {len(self.parts)} parts)"

    def join(self) -> bytes:
        """The message as one bytes object (a copy, unless it already is one)."""
        parts = self.parts
        return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)


def encode(obj: object, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialize one message to bytes the peer's :func:`decode` accepts.

    Refuses (``ProtocolError``) anything outside the schema, or over ``limits``,
    here on the sender, where the error is easier to understand than on the peer.
    A contiguous CPU tensor's data is copied once, into the returned bytes.
    """
    encoded = encode_parts(obj, limits=limits)
    data = encoded.join()
    del encoded  # drop the views before the tensors they point into
    return data


def encode_parts(obj: object, *, limits: Limits = DEFAULT_LIMITS, owned: bool = False) -> Encoded:
    """Like :func:`encode`, without joining: tensors' memory stays where it is, viewed, not copied.

    ``owned=True``: the caller hands ``obj`` over (e.g. a snapshot no one else holds), so no one
    writes the memory it views and :meth:`Encoded.owned` need not copy it.
    """
    enc = _Encoder(limits)
    out: list = []
    try:
        enc.value(obj, out, 0)
    except ProtocolError:
        raise
    except (OverflowError, UnicodeEncodeError) as exc:
        what = "int outside the 64-bit range" if isinstance(exc, OverflowError) else "str that is not valid UTF-8"
        raise ProtocolError(f"cannot encode {what}") from None
    except RecursionError:
        raise ProtocolError("cannot encode: nesting too deep") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        # e.g. msgpack refusing an object, a tensor that numpy cannot view.
        raise ProtocolError(f"cannot encode: {type(exc).__name__}") from exc
    result = Encoded(out, enc.keep, () if owned else enc.views)
    if result.size > limits.max_message_bytes:
        raise ProtocolError(f"message of {result.size} bytes exceeds max_message_bytes={limits.max_message_bytes}")
    return result


# ---------------------------------------------------------------------------
# Decoder


class _Decoder:
    """One decode call: counts items across every (nested) msgpack pass."""

    __slots__ = ("limits", "items", "frames")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.items = 0
        self.frames = 0

    def count(self, container: Any) -> Any:
        # Runs as each array/map is finished, so memory stays near max_items objects
        # instead of whatever a large message could expand to.
        self.items += len(container)
        if self.items > self.limits.max_items:
            raise ProtocolError(f"more than max_items={self.limits.max_items} container elements")
        return container

    def list_hook(self, items: list) -> Any:
        if items and items[0] is _TUPLE_MARK:
            return self.count(tuple(items[1:]))
        if items and items[0] is _FRAME_MARK:
            return self.frame(items[1:])
        return self.count(items)

    def frame(self, items: list) -> Any:
        """Counted like a tuple of its items; built only after every item was decoded and bounded."""
        self.count(items)
        self.frames += wire_frames.units(items)  # the frame and each column
        if self.frames > wire_frames.MAX_COLUMNS:
            raise ProtocolError(f"more DataFrames, Series and columns in one message than {wire_frames.MAX_COLUMNS} "
                                f"units ({wire_frames.FRAME_UNITS} per frame, 1 per column)")
        return wire_frames.build(items, self.limits.max_items)

    def unpack(self, buf: Buffer) -> Any:
        n = len(buf)
        lim = self.limits
        return msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=False,
            use_list=True,
            timestamp=0,
            list_hook=self.list_hook,
            object_hook=self.count,
            ext_hook=self.ext_hook,
            max_str_len=min(lim.max_str_bytes, n),
            max_bin_len=n,
            max_array_len=min(lim.max_items, n),
            max_map_len=min(lim.max_items, n // 2),
            max_ext_len=n,
        )

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_FRAME:
            if data:
                raise ProtocolError("bad frame marker")
            return _FRAME_MARK  # anywhere but first in an array, _validate refuses it
        if code == EXT_TUPLE:
            if data:
                raise ProtocolError("bad tuple marker")
            return _TUPLE_MARK  # anywhere but first in an array, _validate refuses it
        dec = _EXT_DECODERS.get(code)
        if dec is None:
            raise ProtocolError(f"unknown ext type {code}")
        return dec(data, self.limits)


def _small(data: bytes, limits: Limits) -> Any:
    """Unpack a small fixed-layout ext payload; no hooks, so nothing nests further."""
    n = len(data)
    return msgpack.unpackb(
        data, raw=False, use_list=True, strict_map_key=True,
        max_str_len=min(32, n), max_bin_len=n, max_array_len=min(max(limits.max_ndim, 4), n),
        max_map_len=0, max_ext_len=0,
    )


_SMALL_PAYLOAD = 16 * 1024


def _split_bin(data: bytes, nfields: int, limits: Limits) -> tuple[list, memoryview]:
    """Parse ``[field, ..., bin]`` and return the bin as a view into ``data`` (no copy)."""
    if len(data) <= _SMALL_PAYLOAD:  # copying a little data is cheaper than an Unpacker
        v = _small(data, limits)
        if type(v) is not list or len(v) != nfields or type(v[-1]) is not bytes:
            raise ProtocolError("bad ext payload layout")
        return v[:-1], memoryview(v[-1])
    head_max = 64 + 10 * limits.max_ndim
    u = msgpack.Unpacker(
        raw=False, use_list=True, strict_map_key=True, max_buffer_size=head_max,
        max_str_len=32, max_bin_len=0, max_array_len=max(limits.max_ndim, nfields), max_map_len=0,
        max_ext_len=0,
    )
    u.feed(data[:head_max])
    if u.read_array_header() != nfields:
        raise ProtocolError("ext payload has the wrong number of fields")
    fields = [u.unpack() for _ in range(nfields - 1)]
    pos = u.tell()
    if pos >= len(data):
        raise ProtocolError("ext payload truncated")
    tag = data[pos]
    if tag == 0xC4:
        start = pos + 2
    elif tag == 0xC5:
        start = pos + 3
    elif tag == 0xC6:
        start = pos + 5
    else:
        raise ProtocolError("ext payload data is not binary")
    if start > len(data):
        raise ProtocolError("ext payload truncated")
    length = int.from_bytes(data[pos + 1 : start], "big")
    if start + length != len(data):
        raise ProtocolError("ext payload length mismatch")
    return fields, memoryview(data)[start:]


def _dtype_name(name: object, table: dict) -> str:
    if type(name) is not str or name not in table:
        raise ProtocolError("dtype not allowed")
    return name


def _check_shape(shape: object, itemsize: int, nbytes: int, limits: Limits) -> list:
    """Validate a shape against the data length without ever forming an overflowing product."""
    if type(shape) is not list:
        raise ProtocolError("shape is not a list")
    if len(shape) > limits.max_ndim:
        raise ProtocolError(f"more than max_ndim={limits.max_ndim} dims")
    count = 1
    bound = itemsize  # bytes the shape would span with zero dims counted as 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError("shape entries must be non-negative ints")
        bound *= d if d > 1 else 1
        if bound > _I64_MAX:
            raise ProtocolError("shape too large")
        count *= d
    if count * itemsize != nbytes:
        raise ProtocolError("shape and data size do not match")
    return shape


def _fill(dst: np.ndarray, src: memoryview, name: str) -> None:
    """Copy wire bytes into a fresh uint8 view of the result: the one copy on decode."""
    s = np.frombuffer(src, dtype=np.uint8)
    if name == "bool" and s.size and s.max() > 1:
        raise ProtocolError("bool data holds values other than 0 and 1")
    np.copyto(dst, s)
    if not _LITTLE:
        unit = _ITEMSIZE[name] // (2 if name.startswith("complex") else 1)
        if unit > 1:
            dst.view(f"u{unit}").byteswap(inplace=True)


def _dec_tensor(data: bytes, limits: Limits, adopt: bool = False) -> torch.Tensor:
    (name, shape, requires_grad), body = _split_bin(data, 4, limits)
    name = _dtype_name(name, _TORCH_DTYPE)
    _check_shape(shape, _ITEMSIZE[name], len(body), limits)
    dtype = _TORCH_DTYPE[name]
    if type(requires_grad) is not bool:
        raise ProtocolError("requires_grad must be a bool")
    if requires_grad and dtype not in _TORCH_GRAD_OK:
        raise ProtocolError("requires_grad is only allowed on floating point and complex tensors")
    n = len(body)
    if adopt and n and _LITTLE and not body.readonly and _aligned(body, _ITEMSIZE[name]):
        if name == "bool" and np.frombuffer(body, dtype=np.uint8).max() > 1:
            raise ProtocolError("bool data holds values other than 0 and 1")
        t = torch.frombuffer(body, dtype=torch.uint8).view(dtype).reshape(shape)  # the message's own bytes
        if requires_grad:
            t.requires_grad_(True)
        return t
    t = torch.empty(shape, dtype=dtype)
    if n:
        # Not via t.numpy(): that would leave the result's storage non-resizable.
        src = np.frombuffer(body, dtype=np.uint8)
        if name == "bool" and src.max() > 1:
            raise ProtocolError("bool data holds values other than 0 and 1")
        if not _LITTLE and _ITEMSIZE[name] > 1:
            src = src.copy()
            _fill(src, body, name)  # byteswapped into the temporary
        if t.untyped_storage().nbytes() != n or t.data_ptr() == 0:
            raise ProtocolError("internal size mismatch")  # unreachable after _check_shape
        ctypes.memmove(t.data_ptr(), src.ctypes.data, n)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _aligned(body: memoryview, itemsize: int) -> bool:
    return np.frombuffer(body, dtype=np.uint8).ctypes.data % itemsize == 0


def _dec_ndarray(data: bytes, limits: Limits, adopt: bool = False) -> np.ndarray:
    (name, shape), body = _split_bin(data, 3, limits)
    name = _dtype_name(name, _NP_DTYPE)
    _check_shape(shape, _ITEMSIZE[name], len(body), limits)
    if adopt and len(body) and _LITTLE and not body.readonly and _aligned(body, _ITEMSIZE[name]):
        view = np.frombuffer(body, dtype=np.uint8)
        if name == "bool" and view.max() > 1:
            raise ProtocolError("bool data holds values other than 0 and 1")
        return view.view(_NP_DTYPE[name]).reshape(shape)  # the message's own bytes
    a = np.empty(shape, dtype=_NP_DTYPE[name])
    if len(body):
        _fill(a.reshape(-1).view(np.uint8), body, name)
    return a


def _dec_np_scalar(data: bytes, limits: Limits) -> np.generic:
    v = _small(data, limits)
    if type(v) is not list or len(v) != 2 or type(v[1]) is not bytes:
        raise ProtocolError("bad numpy scalar payload")
    name = _dtype_name(v[0], _NP_DTYPE)
    if len(v[1]) != _ITEMSIZE[name]:
        raise ProtocolError("numpy scalar data has the wrong size")
    if name == "bool" and v[1][0] > 1:
        raise ProtocolError("bool data holds values other than 0 and 1")
    return np.frombuffer(v[1], dtype=_NP_DTYPE[name].newbyteorder("<"))[0]


def _dec_complex(data: bytes, limits: Limits) -> complex:
    v = _small(data, limits)
    if type(v) is not list or len(v) != 2 or type(v[0]) is not float or type(v[1]) is not float:
        raise ProtocolError("bad complex payload")
    return complex(v[0], v[1])


def _dec_slice(data: bytes, limits: Limits) -> slice:
    v = _small(data, limits)
    if type(v) is not list or len(v) != 3:
        raise ProtocolError("bad slice payload")
    for p in v:
        if p is not None:
            _check_i64(p, "slice start/stop/step")
    return slice(v[0], v[1], v[2])


def _dec_ellipsis(data: bytes, limits: Limits) -> object:
    if data != b"\xc0":
        raise ProtocolError("bad Ellipsis payload")
    return Ellipsis


def _dec_torch_dtype(data: bytes, limits: Limits) -> torch.dtype:
    return _TORCH_DTYPE[_dtype_name(_small(data, limits), _TORCH_DTYPE)]


def _dec_torch_size(data: bytes, limits: Limits) -> torch.Size:
    v = _small(data, limits)
    if type(v) is not list or len(v) > limits.max_ndim:
        raise ProtocolError("bad torch.Size payload")
    for d in v:
        _check_i64(d, "torch.Size entry")
    return torch.Size(v)


def _dec_np_dtype(data: bytes, limits: Limits) -> np.dtype:
    return _NP_DTYPE[_dtype_name(_small(data, limits), _NP_DTYPE)]


def _dec_ciphertext(data: Any, limits: Limits) -> Ciphertext:
    n = len(data)
    v = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, max_str_len=32, max_bin_len=n,
                        max_array_len=max(4, ciphertext.MAX_PARTS), max_map_len=0, max_ext_len=0)
    if type(v) is not list or len(v) != 4 or type(v[2]) is not list or type(v[3]) is not list:
        raise ProtocolError("bad ciphertext payload")
    kind, context, parts, sizes = v
    if type(kind) is not str or type(context) is not bytes or not all(type(p) is bytes for p in parts) \
            or not all(type(s) is int for s in sizes):
        raise ProtocolError("bad ciphertext payload")
    try:
        return Ciphertext(kind, context, tuple(parts), tuple(sizes))
    except ValueError as exc:
        raise ProtocolError(f"bad ciphertext: {exc}") from None


def _enc_ciphertext(enc: _Encoder, c: Ciphertext) -> tuple[int, list]:
    head = b"\x94" + enc.pack(c.kind) + enc.pack(c.context) + _array_header(len(c.parts))
    out: list = [head]
    for p in c.parts:
        out += [_bin_header(len(p)), p]
    out.append(enc.pack(list(c.sizes)))
    return EXT_CIPHERTEXT, out


def _dec_ref(data: bytes, limits: Limits) -> Ref:
    if len(data) == 1 and data[0] < 0x80:  # positive fixint: the common case, kept cheap
        return Ref(data[0])
    v = _small(data, limits)
    if type(v) is not int or not 0 <= v <= _I64_MAX:
        raise ProtocolError("bad Ref payload")
    return Ref(v)


_ADOPTING_DECODERS: dict[int, Callable[[Any, Limits], Any]] = {
    EXT_TENSOR: lambda data, limits: _dec_tensor(data, limits, adopt=True),
    EXT_NDARRAY: lambda data, limits: _dec_ndarray(data, limits, adopt=True),
}
_EXT_DECODERS: dict[int, Callable[[Any, Limits], Any]] = {
    EXT_TENSOR: _dec_tensor,
    EXT_NDARRAY: _dec_ndarray,
    EXT_NPSCALAR: _dec_np_scalar,
    EXT_COMPLEX: _dec_complex,
    EXT_SLICE: _dec_slice,
    EXT_ELLIPSIS: _dec_ellipsis,
    EXT_TORCH_DTYPE: _dec_torch_dtype,
    EXT_TORCH_SIZE: _dec_torch_size,
    EXT_NP_DTYPE: _dec_np_dtype,
    EXT_REF: _dec_ref,
    EXT_CIPHERTEXT: _dec_ciphertext,
}


class _BorrowingDecoder(_Decoder):
    """Decodes a skeleton whose large payloads were cut out; each placeholder stands for one."""

    __slots__ = ("view", "bigs", "used", "bin_views", "adopt")

    def __init__(self, limits: Limits, view: memoryview, bigs: list, bin_views: bool, adopt: bool) -> None:
        super().__init__(limits)
        self.view = view
        self.bigs = bigs
        self.used: set = set()
        self.bin_views = bin_views
        self.adopt = adopt

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code != wire_scan.PLACEHOLDER_CODE:
            return super().ext_hook(code, data)
        index = int.from_bytes(data, "big") if len(data) == 4 else -1
        if not 0 <= index < len(self.bigs) or index in self.used:
            raise ProtocolError("bad placeholder")  # unreachable: only our skeleton has them
        self.used.add(index)
        big = self.bigs[index]
        payload = self.view[big.data:big.end]
        if not self.adopt:
            payload = payload.toreadonly()
        if big.ext_code is None:
            return payload if self.bin_views else bytes(payload)
        if big.ext_code in (EXT_TUPLE, EXT_FRAME):
            raise ProtocolError("bad tuple or frame marker")
        if self.adopt and big.ext_code in _ADOPTING_DECODERS:
            return _ADOPTING_DECODERS[big.ext_code](payload, self.limits)
        dec = _EXT_DECODERS.get(big.ext_code)
        if dec is None:
            raise ProtocolError(f"unknown ext type {big.ext_code}")
        return dec(payload, self.limits)


def _decode_borrowed(view: memoryview, bigs: list, limits: Limits, bin_views: bool, adopt: bool) -> object:
    """Decode `view` with its large payloads viewed in place (see decode's borrow=True)."""
    if len(view) > limits.max_message_bytes:
        raise ProtocolError(f"message of {len(view)} bytes exceeds max_message_bytes={limits.max_message_bytes}")
    pieces: list = []
    last = 0
    for i, big in enumerate(bigs):
        pieces.append(view[last:big.start])
        pieces.append(b"\xd6" + bytes([wire_scan.PLACEHOLDER_CODE]) + i.to_bytes(4, "big"))
        last = big.end
    pieces.append(view[last:])
    decoder = _BorrowingDecoder(limits, view, bigs, bin_views, adopt)
    obj = decoder.unpack(b"".join(pieces))
    if len(decoder.used) != len(bigs):
        raise ProtocolError("malformed message")  # unreachable: the scan and msgpack agree on the framing
    _validate(obj, limits, _DECODED_BORROWED if bin_views else _DECODED)
    return obj


def _validate(obj: Any, limits: Limits, allowed: frozenset = _DECODED) -> None:
    """Check depth, key types and value types without recursion (inputs may be ~1000 deep)."""
    if type(obj) not in _CONTAINERS:
        if type(obj) not in allowed and not wire_frames.is_frame_type(type(obj)):
            raise ProtocolError(f"unexpected value of type {_type_name(type(obj))}")
        return
    max_depth = limits.max_depth
    stack = [(obj, 1)]
    while stack:
        c, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(f"nesting deeper than max_depth={max_depth}")
        if type(c) is dict:
            key_types = set(map(type, c))
            if not key_types <= _KEY_TYPES:
                bad = sorted(_type_name(k) for k in key_types - _KEY_TYPES)
                raise ProtocolError(f"map keys must be str or int, not {', '.join(bad)}")
            values: Any = c.values()
        else:
            values = c
        vtypes = set(map(type, values))
        if not vtypes <= allowed and not all(map(wire_frames.is_frame_type, vtypes - allowed)):
            bad = sorted(_type_name(k) for k in vtypes - allowed)
            raise ProtocolError(f"unexpected value of type {', '.join(bad)}")
        if not vtypes.isdisjoint(_CONTAINERS):
            for v in values:
                if type(v) in _CONTAINERS:
                    stack.append((v, depth + 1))


def decode(data: Buffer, limits: Limits = DEFAULT_LIMITS, *, borrow: bool = False, bin_views: bool = False,
           adopt: bool = False) -> object:
    """Turn one message from a peer back into Python objects, or raise ``ProtocolError``.

    The peer may be hostile: every size, count, depth, dtype and shape is checked,
    and whatever goes wrong underneath (msgpack, numpy, torch, memory) surfaces as
    ``ProtocolError`` so callers have exactly one thing to catch. Arrays and tensors
    are fresh, writable and independent of ``data``.

    ``borrow=True`` (for a buffer no one will write again, e.g. one a transport handed
    over): a tensor or array of at least BORROW_MIN bytes is read from ``data`` in place
    (into a fresh tensor, as always) rather than from msgpack's copy of it; with
    ``bin_views=True`` as well, such a bin decodes as a read-only memoryview into ``data``
    rather than as bytes (for a caller that expects exactly that, e.g. a release's payload).
    With ``adopt=True`` too, and ``data`` writable and handed over for good (no one else
    keeps or writes it), such views are writable and a large tensor or array whose bytes are
    aligned *is* a view of ``data``: no copy at all.
    """
    if borrow and len(data) >= BORROW_MIN:
        try:
            view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
            bigs = wire_scan.big_payloads(view, BORROW_MIN, limits.max_depth + 1) if view.c_contiguous else None
        except (TypeError, ValueError):
            bigs = None
        if bigs:
            try:
                return _decode_borrowed(view, bigs, limits, bin_views, adopt and not view.readonly)
            except ProtocolError:
                raise
            except Exception as exc:  # as below
                raise ProtocolError(f"malformed message ({type(exc).__name__})") from exc
    try:
        if isinstance(data, memoryview):
            if not data.c_contiguous:
                raise ProtocolError("message buffer is not contiguous")
            if data.ndim != 1 or data.format != "B":
                data = data.cast("B")
        elif not isinstance(data, (bytes, bytearray)):
            raise ProtocolError(f"message must be bytes, not {_type_name(type(data))}")
        if len(data) > limits.max_message_bytes:
            raise ProtocolError(
                f"message of {len(data)} bytes exceeds max_message_bytes={limits.max_message_bytes}"
            )
        if not len(data):
            raise ProtocolError("empty message")
        obj = _Decoder(limits).unpack(data)
        _validate(obj, limits)
        return obj
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack/numpy/torch errors, MemoryError, RecursionError...
        raise ProtocolError(f"malformed message ({type(exc).__name__})") from exc
