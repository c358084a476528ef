"""Encoding without joining, and decoding large payloads where they are (borrow, bin views, adopt).

Differential: for every value and every mutated or arbitrary byte string, decode(borrow=True)
agrees with the ordinary decode (the same value, or ProtocolError for both). With the size
threshold lowered to a few bytes, hypothesis reaches every branch of the framing scan.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from duet import wire, wire_scan
from duet.errors import ProtocolError
from tests.test_wire import PROPERTY, mutated, same, values


@contextlib.contextmanager
def tiny_threshold(n: int = 4) -> Iterator[None]:
    saved = wire.BORROW_MIN
    wire.BORROW_MIN = n
    try:
        yield
    finally:
        wire.BORROW_MIN = saved


def plain_or_error(data: bytes) -> object:
    try:
        return wire.decode(data)
    except ProtocolError as exc:
        return exc


def borrowed_or_error(data: bytes, **kw: bool) -> object:
    try:
        return wire.decode(bytearray(data), borrow=True, **kw)
    except ProtocolError as exc:
        return exc


def as_bytes(value: object) -> object:
    """Bin views compared as the bytes they show."""
    if isinstance(value, memoryview):
        return bytes(value)
    if type(value) is list:
        return [as_bytes(v) for v in value]
    if type(value) is tuple:
        return tuple(as_bytes(v) for v in value)
    if type(value) is dict:
        return {k: as_bytes(v) for k, v in value.items()}
    return value


def agree(data: bytes, **kw: bool) -> None:
    a = plain_or_error(data)
    with tiny_threshold():
        b = borrowed_or_error(data, **kw)
    if isinstance(a, ProtocolError):
        assert isinstance(b, ProtocolError), b
    else:
        assert not isinstance(b, ProtocolError), b
        assert same(a, as_bytes(b)), (a, b)


@PROPERTY
@given(values)
def test_property_borrowed_decoding_agrees_on_every_value(value: object) -> None:
    data = wire.encode(value)
    agree(data)
    agree(data, bin_views=True, adopt=True)


@PROPERTY
@given(mutated())
def test_property_borrowed_decoding_agrees_on_mutated_encodings(data: bytes) -> None:
    agree(data, bin_views=True, adopt=True)


@PROPERTY
@given(st.binary(max_size=300))
def test_property_the_scan_never_fails_on_arbitrary_bytes(data: bytes) -> None:
    found = wire_scan.big_payloads(memoryview(data), 2, 33)
    assert found is None or all(0 <= b.start < b.data <= b.end <= len(data) for b in found)
    agree(data, bin_views=True, adopt=True)


@PROPERTY
@given(values)
def test_property_encode_parts_joins_to_encode_and_nests_as_bytes(value: object) -> None:
    parts = wire.encode_parts(value)
    data = wire.encode(value)
    assert parts.join() == data and parts.size == len(data)
    assert wire.decode(wire.encode({"inner": parts, "after": 1})) == {"inner": data, "after": 1}


def test_a_large_bin_is_a_view_only_when_asked():
    blob = bytes(range(256)) * 8192  # 2 MiB
    data = wire.encode({"encoded": blob, "sha256": "x"})
    assert type(wire.decode(bytearray(data), borrow=True)["encoded"]) is bytes
    view = wire.decode(data, borrow=True, bin_views=True)["encoded"]
    assert isinstance(view, memoryview) and view.readonly and view == blob


def test_adopted_tensors_are_views_of_a_handed_over_buffer_and_copies_otherwise():
    t = torch.arange(2**20, dtype=torch.float32)  # 4 MiB
    data = wire.encode(t)
    head = len(data) - t.numel() * 4  # where the tensor's bytes start
    raw = torch.empty(len(data) + 64, dtype=torch.uint8)
    shift = (-(raw.data_ptr() + head)) % 64
    buf = memoryview(raw.numpy()).cast("B")[shift:shift + len(data)]
    buf[:] = data
    adopted = wire.decode(buf, borrow=True, adopt=True)
    assert torch.equal(adopted, t)
    assert raw.data_ptr() <= adopted.data_ptr() < raw.data_ptr() + len(data) + 64  # no copy
    adopted[0] = -1.0  # writable; it is the buffer's memory now
    assert buf[head:head + 4].tobytes() == np.float32(-1.0).tobytes()
    # Without adopt, from a read-only buffer, or unaligned: a fresh tensor.
    for kwargs, source in [({}, buf), ({"adopt": True}, buf.toreadonly()), ({"adopt": True}, bytes(data))]:
        copy = wire.decode(source, borrow=True, **kwargs)
        assert not (raw.data_ptr() <= copy.data_ptr() < raw.data_ptr() + len(data) + 64)
    unaligned = memoryview(bytearray(b"\0" + data))[1:] if (shift + 1) % 4 else memoryview(bytearray(b"\0\0" + data))[2:]
    copy = wire.decode(unaligned, borrow=True, adopt=True)
    assert torch.equal(copy[1:], t[1:])


def test_adopted_bool_data_is_still_checked():
    t = torch.ones(2**21, dtype=torch.bool)
    data = bytearray(wire.encode(t))
    data[-5] = 2  # a bool byte that is neither 0 nor 1
    with pytest.raises(ProtocolError, match="bool"):
        wire.decode(data, borrow=True, adopt=True)


def test_a_placeholder_code_from_a_peer_is_refused_not_trusted():
    payload = b"\xd6" + bytes([wire_scan.PLACEHOLDER_CODE]) + (0).to_bytes(4, "big")
    data = b"\x92" + payload + b"\xc6" + (2**21).to_bytes(4, "big") + bytes(2**21)
    with pytest.raises(ProtocolError, match="unknown ext"):
        wire.decode(bytearray(data), borrow=True, bin_views=True, adopt=True)


def test_encoded_parts_keep_their_tensors_alive():
    parts = wire.encode_parts(torch.full((2**20,), 7.0))  # the tensor is only referenced by parts now
    gc.collect()
    filler = [torch.zeros(2**20) for _ in range(4)]  # would reuse freed memory
    assert torch.equal(wire.decode(parts.join()), torch.full((2**20,), 7.0))
    del filler


# -- owned(): the message as it was when it was sent ---------------------------------------------------
@PROPERTY
@given(values)
def test_property_an_owned_message_is_the_same_message(value: object) -> None:
    parts = wire.encode_parts(value)
    assert parts.owned().join() == wire.encode(value)
    assert wire.encode_parts(value, owned=True).owned().join() == wire.encode(value)


def test_owned_copies_the_callers_tensors_and_arrays_and_nothing_else():
    t = torch.arange(2**18, dtype=torch.float32)
    a = np.arange(2**18, dtype=np.float64)
    writable = np.arange(2**10, dtype=np.int16)
    frozen = writable.view()
    frozen.flags.writeable = False  # read-only here, written through another view
    blob = bytes(2**17)
    msg = {"t": t, "a": a, "frozen": frozen, "blob": blob, "n": 3}
    before = wire.encode(msg)
    parts = wire.encode_parts(msg)
    viewed = {np.frombuffer(view, dtype=np.uint8).ctypes.data for view, _ in parts.views}
    assert viewed == {t.data_ptr(), a.ctypes.data, frozen.ctypes.data}  # bytes are immutable: never copied
    owned = parts.owned()
    t.add_(1)
    a += 1
    writable[0] = 7
    assert owned.join() == before  # the value when owned() was called
    assert parts.join() != before  # the views themselves show the change
    assert not owned.views and owned.owned() is owned
    assert any(p is blob for p in owned.parts)


def test_copies_the_encoder_made_itself_are_not_copied_again():
    t = torch.arange(2**18, dtype=torch.float32).reshape(512, 512)
    for value in (t.T, t[:, ::2], t.to(torch.complex64).conj(), t.to(torch.complex64).conj().imag,
                  np.asfortranarray(t.numpy()), t.numpy().astype(">f4")):
        assert wire.encode_parts(value).views == ()  # a contiguous copy of ours, nobody else's
    assert len(wire.encode_parts(t).views) == 1
    assert len(wire.encode_parts(t.to(torch.bfloat16)).views) == 1
    assert wire.encode_parts(torch.zeros(0)).views == ()  # no bytes to copy


def test_handed_over_values_are_not_copied_even_inside_another_message():
    snap = torch.arange(2**20, dtype=torch.float32)
    inner = wire.encode_parts(snap, owned=True)
    outer = wire.encode_parts({"encoded": inner, "sha256": "x"})
    assert outer.views == () and outer.owned() is outer
    big = max(outer.parts, key=lambda p: memoryview(p).nbytes)
    assert np.frombuffer(big, dtype=np.uint8).ctypes.data == snap.data_ptr()  # the snapshot's own bytes
    # Not handed over: the inner message's views are the outer one's too.
    mine = torch.arange(2**20, dtype=torch.float32)
    outer = wire.encode_parts({"encoded": wire.encode_parts(mine), "sha256": "x"})
    before = outer.join()
    owned = outer.owned()
    mine.add_(1)
    assert owned.join() == before != outer.join()


def test_an_owned_message_does_not_keep_the_callers_tensor_alive():
    t = torch.full((2**20,), 7.0)
    ref = weakref.ref(t)
    owned = wire.encode_parts({"value": t}).owned()
    del t
    gc.collect()
    assert ref() is None  # the caller's memory is freed once the caller lets it go
    assert torch.equal(wire.decode(owned.join())["value"], torch.full((2**20,), 7.0))
