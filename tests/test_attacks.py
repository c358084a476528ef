"""Escape attempts against the owner's allowlist, sent as raw messages past the client's checks.

Each must be refused with a clear error, and the owner must keep serving.
"""
from __future__ import annotations

import concurrent.futures
import pickle

import pytest
import numpy as np
import torch

import duet
from duet import wire
from duet.wire import Ref


def _raw_call(scientist: duet.Scientist, kind: str, name: str, args=None, kwargs=None) -> int:
    rid = scientist._new_rid()
    scientist.session.send({"t": "call", "rid": rid, "kind": kind, "name": name, "args": args or [], "kwargs": kwargs or {}})
    return rid


def _failure(scientist: duet.Scientist, rid: int) -> BaseException:
    """The owner's verdict on an object: released value, or the error it failed with."""
    fut = scientist.session.request({"kind": "release", "obj": rid, "reason": ""})
    try:
        fut.result(10)
    except (duet.DuetError, concurrent.futures.TimeoutError) as exc:
        return exc
    raise AssertionError(f"object #{rid} was created and released")


def _still_serving(scientist: duet.Scientist) -> None:
    assert torch.equal((scientist.send(torch.tensor([1.0])) + 1).get(timeout=10), torch.tensor([2.0]))


FUNC_ATTACKS = [
    "torch.load", "torch.save", "torch.from_file", "torch.hub.load", "torch.hub.download_url_to_file",
    "torch.ops.aten.add", "torch.compile", "torch.jit.load", "torch.jit.script", "torch.set_num_threads",
    "torch.seed", "torch.set_rng_state", "torch.utils.cpp_extension.load", "numpy.load", "numpy.save", "numpy.fromfile",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.memmap", "numpy.ctypeslib.load_library", "numpy.lib.format.open_memmap",
    "builtins.eval", "builtins.exec", "builtins.open", "builtins.getattr", "builtins.__import__",
    "os.system", "subprocess.run", "importlib.import_module", "pickle.loads", "operator.attrgetter",
    "operator.methodcaller", "torch.nn.Module", "torch.nn.functional.__builtins__", "torch..add", "",
    "torch.nn.modules.module.Module.__init__", "torch.optim.lr_scheduler.LambdaLR", "torch.Tensor.__reduce_ex__",
]


@pytest.mark.parametrize("name", FUNC_ATTACKS)
def test_function_escapes_are_refused(pair, name):
    _, scientist = pair
    rid = _raw_call(scientist, "func", name, ["/etc/passwd"])
    err = _failure(scientist, rid)
    assert isinstance(err, duet.NotAllowed) and "allowlist" in str(err)
    _still_serving(scientist)


def test_manual_seed_seeds_only_the_scientists_generator(pair):
    """torch.manual_seed is allowed, but never reaches the owner's global generators."""
    _, scientist = pair
    before_torch, before_numpy = torch.get_rng_state(), np.random.get_state()[1].copy()
    scientist.torch.manual_seed(1234)
    a = scientist.torch.rand(3).get(timeout=10)
    scientist.torch.manual_seed(1234)
    b = scientist.torch.rand(3).get(timeout=10)
    assert torch.equal(a, b)  # reproducible for the scientist
    assert torch.equal(torch.get_rng_state(), before_torch)  # the owner's generator never moved
    assert np.array_equal(np.random.get_state()[1], before_numpy)
    rid = _raw_call(scientist, "func", "torch.manual_seed", ["/etc/passwd"])
    assert isinstance(_failure(scientist, rid), duet.NotAllowed)


METHOD_ATTACKS = [
    "__class__", "__reduce_ex__", "__getattribute__", "__setattr__", "__init__", "__dict__", "tofile", "dump",
    "dumps", "untyped_storage", "storage", "data_ptr", "register_hook", "share_memory_", "_make_subclass", "apply",
    "register_forward_hook", "_apply", "__globals__", "grad_fn", "numpy.load", "save",
]


@pytest.mark.parametrize("name", METHOD_ATTACKS)
@pytest.mark.parametrize("target", ["tensor", "array", "module"])
def test_method_escapes_are_refused(pair, name, target):
    _, scientist = pair
    if target == "tensor":
        ptr = scientist.send(torch.ones(2))
    elif target == "array":
        ptr = scientist.numpy.ones(2)
    else:
        ptr = scientist.torch.nn.Linear(2, 2)
    rid = _raw_call(scientist, "method", name, [Ref(ptr.id), "/tmp/duet-never-written"])
    err = _failure(scientist, rid)
    assert isinstance(err, duet.NotAllowed) and "allowlist" in str(err)
    _still_serving(scientist)


@pytest.mark.parametrize("name", ["__class__", "__dict__", "grad_fn", "_modules", "__globals__", "storage", "device"])
def test_attribute_escapes_are_refused(pair, name):
    _, scientist = pair
    ptr = scientist.send(torch.ones(2))
    err = _failure(scientist, _raw_call(scientist, "attr", name, [Ref(ptr.id)]))
    assert isinstance(err, duet.NotAllowed)
    _still_serving(scientist)


@pytest.mark.parametrize(
    "kind,name,args,kwargs,match",
    [
        ("func", "torch.add", [1, 2], {"out": 5}, "out"),
        ("func", "torch.zeros", [2], {"device": "cuda"}, "device"),
        ("call", "forward", ["not a ref"], {}, "remote object"),
        ("exec", "print", [], {}, "unknown action kind"),
        ("method", "add", [5], {}, "remote object"),
        ("func", "torch.add", [Ref(999_999), 1], {}, "does not exist"),
        ("func", "torch.zeros", [10**12], {}, "more than"),
        ("func", "numpy.zeros", [[10**6, 10**6]], {}, "more than"),
        ("func", "torch.arange", [0, 10**15], {}, "more than"),
        ("func", "numpy.array", [["a", "b"]], {}, "numeric"),
        ("func", "numpy.array", [[1, 2]], {"dtype": "O"}, "numeric"),
        ("func", "torch.add", "not a list", {}, "malformed"),
    ],
)
def test_malformed_and_oversized_actions_are_refused(pair, kind, name, args, kwargs, match):
    _, scientist = pair
    err = _failure(scientist, _raw_call(scientist, kind, name, args, kwargs))
    assert isinstance(err, (duet.NotAllowed, duet.LimitExceeded)), err
    assert match in str(err)
    _still_serving(scientist)


def test_calling_a_tensor_is_refused(pair):
    _, scientist = pair
    ptr = scientist.send(torch.ones(2))
    err = _failure(scientist, _raw_call(scientist, "call", "forward", [Ref(ptr.id)]))
    assert isinstance(err, duet.NotAllowed) and "cannot be called" in str(err)


def test_repeat_bomb_is_refused(pair):
    _, scientist = pair
    ptr = scientist.send(torch.ones(10))
    err = _failure(scientist, _raw_call(scientist, "method", "repeat", [Ref(ptr.id), 10**6, 10**6]))
    assert isinstance(err, duet.LimitExceeded)
    _still_serving(scientist)


def _send_bytes(scientist: duet.Scientist, data: bytes) -> None:
    scientist.session.transport.send(data)


def test_pickled_payload_is_dropped(pair):
    owner, scientist = pair

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _send_bytes(scientist, pickle.dumps(Evil()))
    _send_bytes(scientist, pickle.dumps({"t": "call"}))
    _still_serving(scientist)
    assert owner.scientists, "the scientist is still connected"


def test_deeply_nested_message_is_dropped(pair):
    _, scientist = pair
    nested: list = []
    for _ in range(200):
        nested = [nested]
    raw = b"\x91" * 100_000 + b"\xc0"  # 100k nested arrays, msgpack-encoded by hand
    _send_bytes(scientist, raw)
    with pytest.raises(duet.ProtocolError):
        wire.encode(nested) and wire.decode(wire.encode(nested))
    _still_serving(scientist)


def test_oversized_claims_are_dropped(pair):
    _, scientist = pair
    _send_bytes(scientist, b"\xdf\xff\xff\xff\xff")  # a map claiming 4 billion entries
    _send_bytes(scientist, b"\xc6\xff\xff\xff\xff" + b"x" * 10)  # bin claiming 4 GiB
    _still_serving(scientist)


def test_messages_of_unknown_type_are_ignored(pair):
    _, scientist = pair
    scientist.session.send({"t": "welcome", "pub": b"x" * 32})
    scientist.session.send({"t": "rep", "id": 1, "ok": True, "value": 1})
    scientist.session.send({"t": "free", "ids": ["a", None, -1]})
    _still_serving(scientist)


def test_scientists_cannot_reach_each_others_objects(tmp_path):
    """Object ids are per scientist: the same id names nothing in another table."""
    owner, first = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    try:
        secret = first.send(torch.tensor([42.0]))
        first.ping()
        from duet.owner.objects import ObjectTable

        other = ObjectTable()
        with pytest.raises(duet.UnknownObject):
            other.get(secret.id)
    finally:
        first.close()
        owner.close()
