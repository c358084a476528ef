"""The Executor on its own: an ObjectTable, actions by name, no session or owner around it.

What runs (the allowlist, forbidden keywords, malformed actions), what the results' lineage is
(private in, private out; public in, public out; an in-place write taints its target), what a
failure on private inputs tells, and the per-scientist limits.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duet.errors import LimitExceeded, NotAllowed, RemoteError, UnknownObject
from duet.owner.executor import Executor
from duet.owner.objects import Limits, ObjectTable
from duet.wire import Ref

PRIVATE, PUBLIC, OTHER = 1, 2, 3  # ids of the objects every test starts with


def _executor(limits: Limits | None = None) -> Executor:
    table = ObjectTable(limits)
    table.put(PRIVATE, torch.tensor([1.0, 2.0, 3.0]), lineage={"ages"}, ops=[])
    table.put(PUBLIC, torch.tensor([10.0, 20.0, 30.0]), lineage=(), ops=[])
    table.put(OTHER, torch.tensor([5.0, 5.0, 5.0]), lineage={"weights"}, ops=[])
    return Executor(table)


@pytest.fixture
def ex() -> Executor:
    return _executor()


@pytest.fixture(autouse=True)
def _quiet_withheld_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="duet.owner.executor")  # failures on private inputs are logged


# -- what runs ----------------------------------------------------------------------

def test_an_allowlisted_function_runs_and_its_result_is_stored_under_the_id(ex):
    obj = ex.run(10, "func", "torch.add", [Ref(PUBLIC), Ref(PUBLIC)], {})
    assert torch.equal(obj.value, torch.tensor([20.0, 40.0, 60.0]))
    assert ex.table.get(10) is obj
    assert list(obj.group.ops.labels()) == ["torch.add"]


def test_methods_and_attributes_run_on_the_referenced_object(ex):
    assert ex.run(10, "method", "sum", [Ref(PUBLIC)], {}).value.item() == 60.0
    assert ex.run(11, "method", "size", [Ref(PUBLIC)], {"dim": 0}).value == 3
    assert ex.run(12, "attr", "shape", [Ref(PUBLIC)], {}).value == torch.Size([3])


def test_no_result_id_runs_the_action_but_stores_nothing(ex):
    before = len(ex.table)
    assert ex.run(None, "method", "add_", [Ref(PUBLIC), 1.0], {}) is None
    assert len(ex.table) == before
    assert torch.equal(ex.table.get(PUBLIC).value, torch.tensor([11.0, 21.0, 31.0]))


def test_empty_allocates_zeroed_memory(ex):
    assert torch.equal(ex.run(10, "func", "torch.empty", [1000], {}).value, torch.zeros(1000))
    assert torch.equal(ex.run(11, "method", "new_empty", [Ref(PUBLIC), (500,)], {}).value, torch.zeros(500))


@pytest.mark.parametrize("kind, name, args, kwargs, message", [
    ("func", "os.system", ["true"], {}, "os.system is not on the owner's allowlist"),
    ("func", "builtins.eval", ["1"], {}, "builtins.eval is not on the owner's allowlist"),
    ("method", "__reduce_ex__", [Ref(PUBLIC), 2], {}, "Tensor.__reduce_ex__ is not on the owner's allowlist"),
    ("method", "data_ptr", [Ref(PUBLIC)], {}, "Tensor.data_ptr is not on the owner's allowlist"),
    ("method", "register_hook", [Ref(PUBLIC), Ref(PUBLIC)], {}, "Tensor.register_hook is not on the owner's allowlist"),
    ("attr", "__dict__", [Ref(PUBLIC)], {}, "attribute Tensor.__dict__ is not on the owner's allowlist"),
    ("call", "forward", [Ref(PUBLIC)], {}, "a Tensor cannot be called"),
    ("import", "os", [], {}, "unknown action kind 'import'"),
    ("func", "torch.zeros", [3], {"out": Ref(PUBLIC)}, "keyword argument 'out' is not allowed"),
    ("func", "torch.zeros", [3], {"device": "cuda"}, "keyword argument 'device' is not allowed"),
    ("method", "sum", [7], {}, "the first argument must be a remote object"),
    ("attr", "shape", [], {}, "the first argument must be a remote object"),
    ("func", "torch.add", (Ref(PUBLIC), Ref(PUBLIC)), {}, "args must be a list and kwargs a dict"),
    ("func", "torch.add", [Ref(PUBLIC), Ref(PUBLIC)], [], "args must be a list and kwargs a dict"),
    ("attr", "shape", [Ref(PUBLIC), 1], {}, "attribute Tensor.shape takes no arguments"),
])
def test_anything_off_the_list_is_refused_and_nothing_is_stored(ex, kind, name, args, kwargs, message):
    before = torch.clone(ex.table.get(PUBLIC).value)
    with pytest.raises(NotAllowed, match=re.escape(message)):
        ex.run(10, kind, name, args, kwargs)
    assert 10 not in ex.table
    assert torch.equal(ex.table.get(PUBLIC).value, before)


def test_a_refusal_on_a_receiver_of_private_type_does_not_name_the_type():
    ex = _executor()
    ex.table.put(20, torch.ones(2), lineage={"ages"}, ops=[], meta={"ages"})  # its type may be private
    with pytest.raises(NotAllowed) as info:
        ex.run(10, "method", "no_such_method", [Ref(20)], {})
    assert "Tensor" not in str(info.value) and "depends on private data" in str(info.value)


def test_an_unknown_object_is_named_as_such(ex):
    with pytest.raises(UnknownObject, match="#99 does not exist"):
        ex.run(10, "func", "torch.add", [Ref(PUBLIC), Ref(99)], {})
    ex.table.free(PUBLIC)
    with pytest.raises(UnknownObject):
        ex.run(10, "method", "sum", [Ref(PUBLIC)], {})


# -- lineage --------------------------------------------------------------------------

def test_public_inputs_give_a_public_result(ex):
    obj = ex.run(10, "func", "torch.mul", [Ref(PUBLIC), 2.0], {})
    assert not obj.private and obj.lineage == set() and obj.shape_public


def test_a_private_input_gives_a_private_result(ex):
    obj = ex.run(10, "func", "torch.add", [Ref(PRIVATE), Ref(PUBLIC)], {})
    assert obj.private and obj.lineage == {"ages"}
    assert obj.shape_public, "the shape came from public metadata"
    assert ex.run(11, "method", "sum", [Ref(10)], {}).lineage == {"ages"}, "and so on down the chain"


def test_two_private_inputs_give_the_union_of_their_assets(ex):
    assert ex.run(10, "func", "torch.add", [Ref(PRIVATE), Ref(OTHER)], {}).lineage == {"ages", "weights"}


def test_the_shape_of_a_private_tensor_with_public_metadata_is_public(ex):
    assert ex.run(10, "attr", "shape", [Ref(PRIVATE)], {}).lineage == set()
    assert ex.run(11, "method", "size", [Ref(PRIVATE)], {"dim": 0}).lineage == set()
    assert ex.run(12, "method", "sum", [Ref(PRIVATE)], {}).lineage == {"ages"}


def test_the_shape_of_a_tensor_with_private_metadata_is_private(ex):
    ex.table.put(20, torch.ones(4), lineage={"ages"}, ops=[], meta={"ages"})  # e.g. a private mask's selection
    obj = ex.run(10, "attr", "shape", [Ref(20)], {})
    assert obj.lineage == {"ages"} and not obj.shape_public


def test_an_in_place_write_of_private_data_taints_the_public_target(ex):
    ex.run(None, "method", "add_", [Ref(PUBLIC), Ref(OTHER)], {})
    assert ex.table.get(PUBLIC).lineage == {"weights"}
    assert ex.table.get(OTHER).lineage == {"weights"}, "the source is unchanged"


def test_a_view_shares_lineage_with_its_base_after_the_base_is_written(ex):
    ex.run(10, "method", "view", [Ref(PUBLIC), 3], {})
    assert not ex.table.get(10).private
    ex.run(None, "method", "mul_", [Ref(PUBLIC), Ref(PRIVATE)], {})
    assert ex.table.get(10).lineage == {"ages"}, "the view shows the written memory"


def test_a_private_seed_is_refused(ex):
    ex.run(10, "method", "sum", [Ref(PRIVATE)], {})
    with pytest.raises(NotAllowed, match="manual_seed takes a public number"):
        ex.run(11, "func", "torch.manual_seed", [Ref(10)], {})
    assert ex.run(12, "func", "torch.manual_seed", [7], {}).lineage == set()


ASSETS = st.sampled_from(["ages", "weights", "labels", "notes"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.frozensets(ASSETS, max_size=2), min_size=1, max_size=5))
def test_a_result_derives_from_exactly_the_assets_of_its_inputs(lineages):
    """For any mix of public and private inputs: the result's assets are the union of theirs."""
    table = ObjectTable()
    for i, lineage in enumerate(lineages):
        table.put(i + 1, torch.full((3,), float(i)), lineage=lineage, ops=[])
    ex = Executor(table)
    obj = ex.run(100, "func", "torch.stack", [[Ref(i + 1) for i in range(len(lineages))]], {})
    expected = set().union(*lineages)
    assert obj.lineage == expected and obj.private == bool(expected)
    assert [table.get(i + 1).lineage for i in range(len(lineages))] == [set(x) for x in lineages], "inputs unchanged"


# -- failures -------------------------------------------------------------------------

def test_a_failure_on_public_inputs_is_reported_as_it_was(ex):
    ex.table.put(20, torch.ones(2), lineage=(), ops=[])
    with pytest.raises(RuntimeError, match="must match the size"):
        ex.run(10, "func", "torch.add", [Ref(PUBLIC), Ref(20)], {})
    assert 10 not in ex.table


def test_a_failure_on_private_inputs_withholds_the_details(ex):
    ex.table.put(20, torch.ones(2), lineage=(), ops=[])
    with pytest.raises(RemoteError) as info:
        ex.run(10, "func", "torch.add", [Ref(PRIVATE), Ref(20)], {})
    assert info.value.op == "torch.add" and info.value.exc_type == "Error"
    assert "withheld" in str(info.value) and "size" not in str(info.value) and "3" not in str(info.value)
    assert 10 not in ex.table


# -- limits ---------------------------------------------------------------------------

def test_an_allocation_over_the_element_limit_is_refused_before_it_runs():
    ex = _executor(Limits(max_elements_per_object=100))
    assert ex.run(10, "func", "torch.zeros", [100], {}).value.numel() == 100
    with pytest.raises(LimitExceeded, match="more than 100 elements"):
        ex.run(11, "func", "torch.zeros", [101], {})
    with pytest.raises(LimitExceeded):
        ex.run(12, "func", "torch.ones", [10, 11], {})
    assert 11 not in ex.table and 12 not in ex.table


def test_the_object_limit_counts_what_the_table_holds():
    ex = _executor(Limits(max_objects=4))  # three are there already
    ex.run(10, "func", "torch.zeros", [1], {})
    with pytest.raises(LimitExceeded, match="object limit reached"):
        ex.run(11, "func", "torch.zeros", [1], {})
    ex.table.free(10)
    assert ex.run(11, "func", "torch.zeros", [1], {}) is ex.table.get(11), "freeing makes room again"


def test_the_byte_limit_refuses_what_would_not_fit():
    ex = _executor(Limits(max_bytes=4096))
    with pytest.raises(LimitExceeded, match="memory limit reached"):
        ex.run(10, "func", "torch.zeros", [2048], {})  # 8 KiB of float32
    assert 10 not in ex.table
    assert ex.run(10, "func", "torch.zeros", [256], {}).value.numel() == 256


def test_a_python_number_too_large_is_refused():
    ex = _executor(Limits(max_python_bits=64))
    with pytest.raises(LimitExceeded):
        ex.run(10, "func", "operator.pow", [2, 10_000], {})
    assert 10 not in ex.table
