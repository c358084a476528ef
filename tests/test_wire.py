"""The wire codec: exact round trips, and hostile bytes that only ever raise ProtocolError."""
from __future__ import annotations

import pickle
import struct
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duet import wire
from duet.errors import ProtocolError
from duet.wire import DEFAULT_LIMITS, Limits, Ref, decode, encode

NP_NAMES = ["bool", "uint8", "int8", "int16", "int32", "int64",
            "float16", "float32", "float64", "complex64", "complex128"]
TORCH_NAMES = NP_NAMES + ["bfloat16"]
I64 = (-(2**63), 2**63 - 1)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers


def same(a: object, b: object) -> bool:
    """Exact equality: types, dtypes, shapes, bits (NaN == NaN, -0.0 != 0.0), dict order."""
    if type(a) is torch.nn.Parameter:
        a = a.data.requires_grad_(a.requires_grad)
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
            and tensor_bytes(a) == tensor_bytes(b)
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return (a.start, a.stop, a.step) == (b.start, b.stop, b.step)
    return a == b


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().clone()  # clone: .numpy() would pin the original's storage
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def roundtrip(obj: object, limits: Limits = DEFAULT_LIMITS) -> object:
    out = decode(encode(obj, limits=limits), limits)
    assert same(obj, out), (obj, out)
    return out


def must_refuse(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> None:
    with pytest.raises(ProtocolError):
        decode(data, limits)


def decodes_or_refuses(data: bytes) -> None:
    """The fuzz contract: a value, or ProtocolError; anything else propagates and fails."""
    try:
        decode(data)
    except ProtocolError:
        pass


def ext(code: int, payload_obj: object) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(payload_obj, use_bin_type=True)))


def tensor_ext(dtype: str, shape: object, data: bytes, requires_grad: object = False) -> bytes:
    return ext(wire.EXT_TENSOR, [dtype, shape, requires_grad, data])


def ndarray_ext(dtype: str, shape: object, data: bytes) -> bytes:
    return ext(wire.EXT_NDARRAY, [dtype, shape, data])


# ---------------------------------------------------------------------------
# round trips of each supported type


SCALARS = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 1.5,
    float("nan"), float("inf"), float("-inf"), "", "héllo ✓ \x00", "x" * 70000, b"", b"\x00\xff" * 40000,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: type(v).__name__)
def test_scalars_round_trip(value: object) -> None:
    roundtrip(value)


EXTS = [
    (), (1,), (1, "a", b"x", None), ((),), (((1,),),), tuple(range(70000)),
    1 + 2j, complex(float("nan"), -0.0), complex(float("inf"), 1),
    slice(None), slice(1, None, -1), slice(-(2**63), 2**63 - 1, 3),
    Ellipsis, Ref(0), Ref(2**63 - 1), torch.Size([]), torch.Size([0, 2, 3]), torch.Size([-1, 4]),
    np.float32(1.5), np.bool_(True), np.bool_(False), np.int64(-3), np.uint8(255), np.float16(np.nan),
    np.complex128(1 - 2j), np.complex64(3j), np.float64(-0.0),
]


@pytest.mark.parametrize("value", EXTS, ids=lambda v: type(v).__name__)
def test_ext_values_round_trip(value: object) -> None:
    roundtrip(value)


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_dtypes_round_trip(name: str) -> None:
    assert decode(encode(getattr(torch, name))) is getattr(torch, name)


@pytest.mark.parametrize("name", NP_NAMES)
def test_numpy_dtypes_and_scalars_round_trip(name: str) -> None:
    dt = np.dtype(name)
    assert decode(encode(dt)) == dt
    scalar = np.ones((), dtype=dt)[()]
    out = roundtrip(scalar)
    assert type(out) is type(scalar)


def test_numpy_aliases_encode_as_their_canonical_name() -> None:
    out = decode(encode(np.longlong(5)))
    assert type(out) is np.int64 and out == 5
    assert decode(encode(np.arange(3, dtype=np.longlong))).dtype == np.int64


SHAPES = [(), (0,), (1,), (3, 4), (2, 0, 3), (1, 1, 1, 1, 2)]


@pytest.mark.parametrize("name", TORCH_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensors_round_trip(name: str, shape: tuple) -> None:
    dtype = getattr(torch, name)
    t = (torch.randn(shape) * 50).to(dtype)
    out = roundtrip(t)
    assert out.untyped_storage().resizable() and out._base is None  # owns its memory
    assert t.untyped_storage().resizable()  # encoding left the sender's tensor alone
    if out.numel():
        out.view(-1)[0] = out.view(-1)[-1]  # writable


@pytest.mark.parametrize("name", NP_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ndarrays_round_trip(name: str, shape: tuple) -> None:
    a = np.asarray(np.random.default_rng(0).standard_normal(shape) * 50).astype(name)
    out = roundtrip(a)
    assert out.flags.writeable and out.flags.owndata
    assert not np.shares_memory(out, a)


def test_special_float_values_in_tensors() -> None:
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    roundtrip(t)
    roundtrip(t.to(torch.bfloat16))
    roundtrip(t.to(torch.float16))


def test_requires_grad_round_trips() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64):
        t = torch.randn(3, 2).to(dtype).requires_grad_(True)
        out = roundtrip(t)
        assert out.requires_grad and out.is_leaf and out.grad_fn is None
    non_leaf = torch.randn(3, requires_grad=True) * 2
    out = decode(encode(non_leaf))
    assert out.requires_grad and out.is_leaf
    p = torch.nn.Parameter(torch.randn(2, 2))
    out = decode(encode(p))
    assert type(out) is torch.Tensor and out.requires_grad and torch.equal(out.detach(), p.detach())


def test_non_contiguous_conj_and_neg_tensors() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    for t in (base[:, ::2], base.transpose(0, 2), base.expand(2, 3, 4, 5), base[1:, 1:, 1:], base[..., 0]):
        out = decode(encode(t))
        assert torch.equal(out, t) and out.is_contiguous()
    c = torch.randn(3, 2, dtype=torch.complex64)
    assert torch.equal(decode(encode(c.conj())), c.conj().resolve_conj())
    assert torch.equal(decode(encode(c.conj().imag)), c.conj().imag.resolve_neg())


def test_non_contiguous_and_byte_swapped_ndarrays() -> None:
    a = np.arange(24, dtype=np.int32).reshape(4, 6)
    for v in (a.T, a[::2, 1::3], np.asfortranarray(a), a.astype(">i4"), a.astype(">c8")[:, ::2]):
        out = decode(encode(v))
        assert out.dtype.isnative and out.shape == v.shape and (out == v).all()


def test_nested_mix_round_trips() -> None:
    msg = {
        "t": "call", "rid": 5, "kind": "func", "name": "torch.add",
        "args": [Ref(1), 2.0, (slice(None, 2), Ellipsis, None)],
        "kwargs": {"out": None, "dtype": torch.float64, 7: [np.float32(2), 1j]},
        "plan": [[{"op": "mul", "in": (Ref(2), Ref(3)), "x": torch.ones(2, 3)}]],
        "arr": np.arange(6).reshape(2, 3), "size": torch.Size([2, 3]), "np_dt": np.dtype("int16"),
    }
    roundtrip(msg)
    roundtrip([msg, (msg,), {"m": msg}])


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode({"x": torch.arange(10), "y": (1, 2)})
    for buf in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        out = decode(buf)
        assert torch.equal(out["x"], torch.arange(10)) and out["y"] == (1, 2)
    ba = bytearray(encode(torch.arange(4)))
    out = decode(ba)
    ba[-8:] = b"\xff" * 8
    assert torch.equal(out, torch.arange(4))  # result does not alias the input buffer


def test_limits_that_fit_round_trip_exactly() -> None:
    lim = Limits(max_depth=3, max_items=7, max_str_bytes=4, max_ndim=2, max_message_bytes=200)
    roundtrip([[["abcd"]], (1,), {"k": 1}], lim)  # depth 3; items 3 (top) + 1 + 1 + 1 + 1 = 7
    roundtrip(torch.zeros(2, 3), lim)


# ---------------------------------------------------------------------------
# encode refuses


class Thing:
    pass


with warnings.catch_warnings():  # deprecated, and refused anyway
    warnings.simplefilter("ignore")
    QUANTIZED = torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)
    MATRIX = np.matrix([[1]])

REFUSED = [
    {1, 2}, frozenset(), Thing(), Thing, object(), lambda: 1, bytearray(b"x"), memoryview(b"x"),
    2**64, -(2**63) - 1, "\ud800", {1.5: 1}, {None: 1}, {True: 1}, {b"k": 1}, {(1,): 2},
    np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "<i4")]), np.zeros(2, dtype="U3"),
    np.zeros(2, dtype=np.longdouble), np.zeros(2, dtype="M8[s]"), np.ma.array([1, 2]), MATRIX,
    np.str_("x"), np.longdouble(1), np.datetime64(1, "s"), np.dtype("O"), np.dtype("f8,i4"), np.dtype(">f4"),
    torch.zeros(2).to_sparse(), torch.zeros(2, device="meta"), QUANTIZED,
    torch.zeros(2, dtype=torch.uint16), torch.zeros(2, dtype=torch.float8_e4m3fn), torch.quint8, torch.uint32,
    slice(1.5), slice("a", "b"), slice(np.int64(1)), slice(2**63), Ref(-1), Ref(2**63), Ref("1"), Ref(True),
    torch.Size([1] * 17), [{1, 2}], {"a": [Thing()]}, (1, set()), [[[[[np.zeros(1, dtype=object)]]]]],
]


@pytest.mark.parametrize("obj", REFUSED, ids=lambda v: type(v).__name__)
def test_encode_refuses_unsupported(obj: object) -> None:
    with pytest.raises(ProtocolError):
        encode(obj)


def test_encode_error_names_type_not_value() -> None:
    with pytest.raises(ProtocolError, match=r"cannot encode .*Thing") as info:
        encode({"secret": Thing()})
    assert "secret" not in str(info.value)


def test_encode_enforces_limits() -> None:
    lim = Limits(max_depth=3, max_items=7, max_str_bytes=4, max_ndim=2, max_message_bytes=200)
    for obj in ([[[[1]]]], [(((),),)], list(range(8)), {"k": list(range(7))}, "abcde", "ééé",
                torch.zeros(1, 1, 1), np.zeros((1, 1, 1)), torch.Size([1, 1, 1]), b"x" * 300,
                {"abcde": 1}, ["abcde"], ("abcde",)):
        with pytest.raises(ProtocolError):
            encode(obj, limits=lim)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ProtocolError):
        encode(deep)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ProtocolError):
        encode(loop)


# ---------------------------------------------------------------------------
# decode refuses hostile input


def test_pickle_payload_is_refused() -> None:
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        must_refuse(pickle.dumps(Thing, protocol=proto))
        must_refuse(pickle.dumps(Thing(), protocol=proto))
    must_refuse(pickle.dumps(torch.ones(2)))


def test_oversized_message_is_refused() -> None:
    data = encode(b"x" * 1000)
    must_refuse(data, Limits(max_message_bytes=len(data) - 1))
    assert decode(data, Limits(max_message_bytes=len(data))) == b"x" * 1000


def test_deep_nesting_is_refused_not_recursion() -> None:
    must_refuse(b"\x91" * 100_000 + b"\xc0")  # lists
    must_refuse(b"\x81\xa1k" * 100_000 + b"\xc0")  # maps
    must_refuse(b"\x91\xc7\x00\x01" * 100_000)  # tuples
    must_refuse(b"\x91" * 33 + b"\xc0")  # just over the default limit
    assert decode(b"\x91" * 32 + b"\xc0") is not None


def test_huge_claimed_counts_are_refused() -> None:
    must_refuse(b"\xdf" + (10_000_000).to_bytes(4, "big") + b"\xa1a\x01")  # map, 10M entries
    must_refuse(b"\xdd" + (2**32 - 1).to_bytes(4, "big") + b"\xc0")  # array
    must_refuse(b"\xdb" + (2**32 - 1).to_bytes(4, "big") + b"abc")  # str
    must_refuse(b"\xc6" + (2**32 - 1).to_bytes(4, "big") + b"abc")  # bin
    must_refuse(b"\xc9" + (2**32 - 1).to_bytes(4, "big") + b"\x02abc")  # ext


def test_item_and_string_limits_on_decode() -> None:
    lim = Limits(max_items=10, max_str_bytes=4)
    must_refuse(encode(list(range(11))), lim)
    must_refuse(encode([[1] * 6, [2] * 6]), lim)
    must_refuse(encode([(1,) * 6, {i: 1 for i in range(6)}]), lim)
    must_refuse(encode("abcde"), lim)
    must_refuse(encode({"abcde": 1}), lim)
    assert decode(encode([list(range(4)), (1, 2, 3)]), lim) == [[0, 1, 2, 3], (1, 2, 3)]


def test_tensor_claiming_astronomical_shape_is_refused() -> None:
    must_refuse(tensor_ext("float32", [2**40, 2**40], b"\x00" * 16))
    must_refuse(tensor_ext("float32", [2**40, 2**40, 0], b""))  # zero elements, strides would overflow
    must_refuse(tensor_ext("float32", [2**64 - 1, 0], b""))
    must_refuse(ndarray_ext("complex128", [2**62, 0], b""))
    must_refuse(tensor_ext("uint8", [2**31] * 16, b"\x00"))
    assert decode(tensor_ext("float32", [2**40, 0], b"")).shape == (2**40, 0)


@pytest.mark.parametrize("maker", [tensor_ext, ndarray_ext])
def test_bad_tensor_headers_are_refused(maker) -> None:
    for name in ("object", "O", "float128", "<f4", "qint8", "str", "V8", "float", "", "x" * 1000):
        must_refuse(maker(name, [1], b"\x00" * 4))
    must_refuse(maker(b"float32", [1], b"\x00" * 4))
    must_refuse(maker("float32", [-1], b""))
    must_refuse(maker("float32", [2, -2], b""))
    must_refuse(maker("float32", [1.0], b"\x00" * 4))
    must_refuse(maker("float32", [True], b"\x00" * 4))
    must_refuse(maker("float32", "1", b"\x00" * 4))
    must_refuse(maker("float32", {"a": 1}, b"\x00" * 4))
    must_refuse(maker("float32", [1] * 17, b"\x00" * 4))  # > max_ndim
    must_refuse(maker("float32", [2, 3], b"\x00" * 23))  # shape/data size mismatch
    must_refuse(maker("float32", [2, 3], b"\x00" * 25))
    must_refuse(maker("float32", [], b""))
    must_refuse(maker("bool", [2], b"\x00\x02"))  # not a valid bool byte
    must_refuse(maker("float32", [1], "abcd"))  # data not binary
    assert decode(maker("bool", [2], b"\x00\x01")).tolist() == [False, True]


def test_tensor_payload_layout_is_strict() -> None:
    good = msgpack.packb(["float32", [1], False, b"\x00" * 4], use_bin_type=True)
    assert decode(msgpack.packb(msgpack.ExtType(wire.EXT_TENSOR, good))).tolist() == [0.0]
    for payload in (
        good + b"\xc0",  # trailing bytes
        good[:-1],  # truncated
        msgpack.packb(["float32", [1], False], use_bin_type=True),
        msgpack.packb(["float32", [1], False, b"\x00" * 4, 1], use_bin_type=True),
        msgpack.packb({"dtype": "float32"}, use_bin_type=True),
        b"",
    ):
        must_refuse(msgpack.packb(msgpack.ExtType(wire.EXT_TENSOR, payload)))


def test_requires_grad_on_integer_tensor_is_refused() -> None:
    for name in ("int64", "int32", "uint8", "bool"):
        must_refuse(tensor_ext(name, [1], b"\x01" * wire._ITEMSIZE[name], requires_grad=True))
    must_refuse(tensor_ext("float32", [1], b"\x00" * 4, requires_grad=1))
    must_refuse(tensor_ext("float32", [1], b"\x00" * 4, requires_grad=None))


def test_unknown_ext_codes_are_refused() -> None:
    for code in (0, 12, 42, 100, 127, -2, -128):
        must_refuse(b"\xd4" + code.to_bytes(1, "big", signed=True) + b"\xc0")
    must_refuse(b"\xd6\xff\x00\x00\x00\x01")  # msgpack's own timestamp ext (-1)
    must_refuse(b"\x91\xd6\xff\x00\x00\x00\x01")


def test_bad_small_ext_payloads_are_refused() -> None:
    bad = [
        (wire.EXT_COMPLEX, [1, 2]), (wire.EXT_COMPLEX, [1.0]), (wire.EXT_COMPLEX, "1+2j"),
        (wire.EXT_SLICE, [1, 2]), (wire.EXT_SLICE, [1.0, None, None]), (wire.EXT_SLICE, [True, None, None]),
        (wire.EXT_SLICE, [2**63, None, None]), (wire.EXT_ELLIPSIS, 1), (wire.EXT_TORCH_DTYPE, "qint8"),
        (wire.EXT_TORCH_DTYPE, "uint16"), (wire.EXT_TORCH_DTYPE, 1), (wire.EXT_NP_DTYPE, "bfloat16"),
        (wire.EXT_NP_DTYPE, "O"), (wire.EXT_NP_DTYPE, "<f4"), (wire.EXT_TORCH_SIZE, [1.0]),
        (wire.EXT_TORCH_SIZE, [1] * 17), (wire.EXT_TORCH_SIZE, [2**64 - 1]), (wire.EXT_REF, -1),
        (wire.EXT_REF, 2**63), (wire.EXT_REF, "1"), (wire.EXT_REF, True), (wire.EXT_REF, [1]),
        (wire.EXT_NPSCALAR, ["float32", b"\x00" * 8]), (wire.EXT_NPSCALAR, ["object", b"\x00" * 8]),
        (wire.EXT_NPSCALAR, ["bool", b"\x07"]), (wire.EXT_NPSCALAR, ["float32"]),
        (wire.EXT_TUPLE, None), (wire.EXT_TUPLE, [1, 2]),
    ]
    for code, payload in bad:
        must_refuse(ext(code, payload))
    must_refuse(msgpack.packb(msgpack.ExtType(wire.EXT_REF, b"\x01\x02")))  # trailing bytes


def test_tuple_marker_only_counts_first_in_array() -> None:
    mark = msgpack.ExtType(wire.EXT_TUPLE, b"")
    assert decode(msgpack.packb([mark, 1, 2])) == (1, 2)
    must_refuse(msgpack.packb(mark))
    must_refuse(msgpack.packb([1, mark]))
    must_refuse(msgpack.packb([mark, mark]))
    must_refuse(msgpack.packb({"a": mark}))
    must_refuse(msgpack.packb({mark: 1}))


def test_bad_map_keys_are_refused() -> None:
    for key in (1.5, None, True, b"k", msgpack.ExtType(wire.EXT_REF, b"\x01"), msgpack.ExtType(wire.EXT_COMPLEX, msgpack.packb([1.0, 2.0]))):
        must_refuse(msgpack.packb({key: 1}, strict_types=False))
    must_refuse(b"\x81\x92\xc7\x00\x01\x01\x01")  # {(1,): 1}
    must_refuse(b"\x81\x91\x01\x01")  # {[1]: 1}: unhashable
    must_refuse(b"\x81\x80\x01")  # {{}: 1}
    assert decode(msgpack.packb({1: "a", "b": 2, -5: None})) == {1: "a", "b": 2, -5: None}


def test_garbage_inputs_are_refused() -> None:
    for data in (b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xa5abc", b"\xa2\xff\xfe", b"\xd9\x02\xed\xa0",
                 "text", None, 123, [1], memoryview(b"abcd")[::2]):
        must_refuse(data)


# ---------------------------------------------------------------------------
# property tests


i64 = st.integers(*I64)
opt_i64 = st.none() | i64
scalars = (
    st.none() | st.booleans() | st.integers(I64[0], 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12)
)


def _arrays(name: str) -> st.SearchStrategy:
    return hnp.arrays(np.dtype(name), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


np_arrays = st.sampled_from(NP_NAMES).flatmap(_arrays)


@st.composite
def tensors(draw) -> torch.Tensor:
    a = draw(np_arrays)
    t = torch.from_numpy(a.copy())
    if t.dtype == torch.float32 and draw(st.booleans()):
        t = t.to(torch.bfloat16)
    if (t.dtype.is_floating_point or t.dtype.is_complex) and draw(st.booleans()):
        t.requires_grad_(True)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # non-contiguous
    return t


leaves = (
    scalars
    | np_arrays
    | tensors()
    | np_arrays.filter(lambda a: a.ndim == 0).map(lambda a: a[()])
    | st.complex_numbers()
    | st.builds(slice, opt_i64, opt_i64, opt_i64)
    | st.just(Ellipsis)
    | st.sampled_from([getattr(torch, n) for n in TORCH_NAMES])
    | st.sampled_from([np.dtype(n) for n in NP_NAMES])
    | st.lists(i64, max_size=16).map(torch.Size)
    | st.builds(Ref, st.integers(0, I64[1]))
)
keys = st.text(max_size=8) | st.integers(I64[0], 2**64 - 1)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
    | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


@PROPERTY
@given(values)
def test_property_round_trip(value: object) -> None:
    roundtrip(value)


@PROPERTY
@given(st.binary(max_size=600))
def test_property_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@PROPERTY
@given(st.binary(max_size=60).map(lambda b: b"\xc7" + bytes([len(b)]) + b"\x02" + b)
       | st.binary(max_size=60).map(lambda b: b"\x91\xc7" + bytes([len(b)]) + b"\x03" + b))
def test_property_random_ext_payloads_only_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(encode(draw(values)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, 0xC9, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@PROPERTY
@given(mutated())
def test_property_mutated_encodings_only_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


def test_decode_never_leaks_other_exceptions_on_every_single_byte_change() -> None:
    msg = encode({"t": "call", "rid": 5, "args": [Ref(1), 2.0, (slice(1, None), ...)],
                  "x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": np.int16(3)})
    for pos in range(len(msg)):
        for value in (0x00, 0x01, 0x7F, 0x80, 0x90, 0xC0, 0xC4, 0xC7, 0xD4, 0xDC, 0xDF, 0xFF, msg[pos] ^ 0x10):
            decodes_or_refuses(msg[:pos] + bytes([value]) + msg[pos + 1 :])
        decodes_or_refuses(msg[:pos])
        decodes_or_refuses(msg[:pos] + msg[pos + 1 :])
