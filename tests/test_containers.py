"""Depth limits of the walks over nested lists, tuples and dicts.

The first part pins, at the boundary, the limit each walk in duet enforces and what it does
beyond it (refuse with its own error, leave the rest out, or answer conservatively): these
guard against hostile nesting, so they must not move. The second part tests the walker they
share, duet.containers.
"""
from __future__ import annotations

import collections
import types

import numpy as np
import pytest
import torch

from duet import containers
from duet.errors import NotAllowed
from duet.wire import Ref


def nest(leaf, n, kind=list):
    """`leaf` inside n containers of `kind`: at depth n (the top-level value is at depth 0)."""
    for _ in range(n):
        leaf = kind([leaf]) if kind is not dict else {"k": leaf}
    return leaf


def innermost(value):
    while isinstance(value, (list, tuple, dict)):
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return value


# -- owner: action arguments -----------------------------------------------------------------


def test_collect_refs_refuses_beyond_32():
    from duet.owner.executor import collect_refs

    for kind in (list, tuple, dict):
        out = []
        collect_refs(nest(Ref(7), 32, kind), out)
        assert out == [7]
        with pytest.raises(NotAllowed, match="action arguments are nested too deeply"):
            collect_refs(nest(Ref(7), 33, kind), [])
        with pytest.raises(NotAllowed, match="action arguments are nested too deeply"):
            collect_refs(nest(1, 33, kind), [])
    out = []
    collect_refs([Ref(1), (Ref(2), {"a": Ref(3), "b": [Ref(4)]}), 5], out)
    assert out == [1, 2, 3, 4]


def test_substitute_and_remap_follow_collect_refs():
    from duet.owner.executor import substitute
    from duet.owner.plans import remap

    class Table:
        def get(self, rid):
            return types.SimpleNamespace(value=f"value{rid}")

    deep = nest(Ref(3), 32, tuple)
    assert innermost(substitute(deep, Table())) == "value3"
    assert innermost(remap(deep, {3: 9})) == Ref(9)
    Point = collections.namedtuple("Point", "x y")
    assert substitute([Point(Ref(1), 2), {"k": Ref(2)}], Table()) == [("value1", 2), {"k": "value2"}]
    assert type(substitute(Point(Ref(1), 2), Table())) is tuple
    assert remap([Ref(1), (Ref(2),), {"a": Ref(1)}, "s"], {1: 10, 2: 20}) == [Ref(10), (Ref(20),), {"a": Ref(10)}, "s"]


def test_make_safe_refuses_results_beyond_8():
    from duet.owner.executor import make_safe

    for kind in (list, tuple, dict):
        assert innermost(make_safe(nest(1.5, 8, kind), "op")) == 1.5
        assert make_safe(nest([], 8, kind), "op") is not None
        with pytest.raises(NotAllowed, match="op returned a structure nested too deeply"):
            make_safe(nest(1.5, 9, kind), "op")
    assert make_safe((x for x in [1, [2]]), "op") == [1, [2]]
    assert make_safe({1: 2}.values(), "op") == [2]
    size = torch.Size([2, 3])
    assert make_safe(size, "op") is size
    Point = collections.namedtuple("Point", "x y")
    assert type(make_safe(Point(1, 2), "op")) is tuple
    with pytest.raises(NotAllowed, match="dict with tuple keys"):
        make_safe({(1,): 2}, "op")
    with pytest.raises(NotAllowed, match="which is not a safe result type"):
        make_safe([object()], "op")


def test_read_only_views_stop_at_16():
    from duet.owner.executor import _read_only_views

    t = torch.zeros(2)
    views = []
    assert isinstance(innermost(_read_only_views(nest(t, 16), views)), np.ndarray) and len(views) == 1
    views = []
    deep = nest(t, 17)
    assert innermost(_read_only_views(deep, views)) is t and views == []
    out = _read_only_views([t, (t,), {"k": t}, 3], views)
    assert isinstance(out[0], np.ndarray) and isinstance(out[1], tuple) and isinstance(out[2]["k"], np.ndarray)
    assert out[3] == 3 and len(views) == 3


def test_flat_stops_at_16_and_counts_a_dict_twice():
    from duet.owner.executor import _flat

    assert _flat(nest(5, 16)) == [5]
    assert _flat(nest(5, 17)) == []
    # A dict's values count two levels below it.
    assert _flat(nest({"k": 5}, 14)) == [5]
    assert _flat(nest({"k": 5}, 15)) == []
    assert _flat([1, (2, {"a": 3}), [[4]]]) == [1, 2, 3, 4]


# -- owner: shadow runs, results ----------------------------------------------------------------


def test_shadow_walks_stop_at_16():
    from duet.owner import shapes

    t = torch.ones(2, 3)
    assert innermost(shapes._to_meta(nest(t, 16))).device.type == "meta"
    with pytest.raises(shapes._Unavailable):
        shapes._to_meta(nest(t, 17))
    Point = collections.namedtuple("Point", "x y")
    p = Point(t, 1)
    assert shapes._to_meta([p])[0] is p  # a namedtuple is passed as it is
    assert shapes.describe(nest(1, 16)) is not None
    with pytest.raises(shapes._Unavailable):
        shapes.describe(nest(1, 17))
    assert shapes.describe((1, [t], {"a": None})) == (
        "tuple", (("int", 1), ("list", (("T", (2, 3), torch.float32, False),)), ("dict", (("a", ("NoneType", None)),))))
    assert shapes.signature(nest(slice(1, 2), 15)) is not None
    with pytest.raises(shapes.Uncacheable):
        shapes.signature(nest(1, 17))
    with pytest.raises(shapes.Uncacheable):
        shapes.signature(nest(slice(1, 2), 16))  # a slice's parts are one level deeper
    m = torch.nn.Linear(2, 2)
    assert shapes.signature(nest(m, 15)) is not None
    with pytest.raises(shapes.Uncacheable):
        shapes.signature(nest(m, 16))  # its parameters are one level deeper
    found = {}
    shapes._modules_in(nest(m, 16), found)
    assert found == {id(m): m}
    found = {}
    shapes._modules_in(nest(m, 17), found)
    assert found == {}


def test_holds_data_is_conservative_beyond_16():
    from duet.owner.shapes import holds_data

    assert holds_data(nest(torch.ones(1), 16))
    assert not holds_data(nest(1, 16))
    assert holds_data(nest(1, 17))  # too deep to tell: as if it held data
    assert not holds_data([1, (2.0,), {"a": "s"}])
    assert holds_data([1, {"a": np.int64(3)}])


def test_size_ints_stop_at_16():
    from duet.owner.bounds import size_ints

    assert size_ints(nest(5, 16)) == [5]
    assert size_ints(nest(5, 17)) == []
    assert size_ints([1, nest(2, 16)]) == [1]
    assert size_ints(nest(5, 16, tuple)) == [5]
    assert size_ints({"a": 5}) == [] and size_ints([True, 2]) == [2]
    assert size_ints([torch.Size([2, 3]), np.int64(4), torch.tensor([5, 6]), np.array([7])]) == [2, 3, 4, 5, 6, 7]


def test_model_arguments_stop_at_4_and_graph_arguments_at_16():
    from duet.owner import models as owner_models
    from duet.scientist import models as sci_models

    for plain in (owner_models._plain, sci_models._plain):
        assert plain(nest(1, 4)) and not plain(nest(1, 5))
        assert plain(nest(1, 4, tuple)) and not plain(nest(1, 4, dict))
        assert plain([None, True, 1.5, "s"]) and not plain([object()])
    Point = collections.namedtuple("Point", "x y")
    assert not owner_models._plain(Point(1, 2))  # exact types only
    assert sci_models._plain(Point(1, 2))
    assert not owner_models._plain(nest("x" * 10_000, 1))
    assert owner_models._arg(nest(1, 16), []) == nest(1, 16)
    with pytest.raises(NotAllowed, match="nested too deeply"):
        owner_models._arg(nest(1, 17), [])
    assert owner_models._arg(slice(1, None), []) == slice(1, None)
    with pytest.raises(NotAllowed, match="nested too deeply"):
        owner_models._arg(nest(slice(1, 2), 16), [])
    with pytest.raises(NotAllowed, match="may not hold dicts"):
        owner_models._arg([{"a": 1}], [])
    node = object()
    assert owner_models._arg(({"$node": 0}, [1]), [node]) == (node, [1])


# -- owner: published values --------------------------------------------------------------------


def test_published_python_values_stop_at_4():
    from duet.owner.store import check_python_value, holds_numbers

    for kind in (list, tuple, dict):
        check_python_value(nest(1, 4, kind))
        with pytest.raises(TypeError, match="nested deeper than 4"):
            check_python_value(nest(1, 5, kind))
    with pytest.raises(TypeError, match="more than 1000000 items"):
        check_python_value([0] * 1_000_000)
    check_python_value([0] * 999_999)
    with pytest.raises(TypeError, match="cannot publish a dict with key 1"):
        check_python_value({1: 2})
    with pytest.raises(TypeError, match="cannot publish a str"):
        check_python_value(["s"])
    assert holds_numbers(nest(1, 4)) and not holds_numbers(nest([], 4))
    assert holds_numbers(nest([], 5))  # too deep to tell: as if it held numbers
    assert not holds_numbers({"a": torch.ones(1)}) and holds_numbers({"a": (torch.ones(1), 2)})


def test_pandas_literal_arguments_are_searched_to_64():
    from duet.owner import frames

    assert frames._holds(lambda v: isinstance(v, Ref), nest(Ref(1), 64))
    assert not frames._holds(lambda v: isinstance(v, Ref), nest(Ref(1), 65))
    assert frames._holds(lambda v: isinstance(v, Ref), [1, (2, {"a": Ref(1)})])
    with pytest.raises(NotAllowed, match="not remote objects"):
        frames._literal("f", [nest(Ref(1), 30)], {})


# -- pairing ----------------------------------------------------------------------------------------


def test_signaling_bodies_stop_at_32():
    from duet.pairing import _check_body

    _check_body(nest("s", 32))
    _check_body(nest(b"x", 32, dict))
    with pytest.raises(ValueError, match="nested deeper than 32 levels"):
        _check_body(nest(1, 33))
    with pytest.raises(ValueError, match="map keys must be str"):
        _check_body({1: 2})
    with pytest.raises(ValueError, match="tuple is not allowed"):
        _check_body([(1,)])


# -- scientist ----------------------------------------------------------------------------------------


class _Client:
    def _free(self, rid):
        pass


def test_call_arguments_stop_at_16():
    from duet.scientist.pointer import Pointer, RefErrors, refs_in

    client = _Client()
    errors = RefErrors(foreign=lambda: ValueError("foreign"), too_deep=lambda: ValueError("too deep"),
                       module_hint="send it")
    p = Pointer(client, 4, "p")
    assert innermost(refs_in(nest(p, 16), client, errors)) == Ref(4)
    assert refs_in(nest(1, 16, dict), client, errors) == nest(1, 16, dict)
    for leaf in (1, p):  # every value at depth 17 is refused, a pointer too
        with pytest.raises(ValueError, match="too deep"):
            refs_in(nest(leaf, 17), client, errors)
    with pytest.raises(ValueError, match="foreign"):
        refs_in([Pointer(_Client(), 1, "q")], client, errors)
    with pytest.raises(TypeError, match="send it"):
        refs_in([torch.nn.Linear(1, 1)], client, errors)
    Point = collections.namedtuple("Point", "x y")
    assert refs_in([Point(p, 1), {"k": p}], client, errors) == [(Ref(4), 1), {"k": Ref(4)}]


def test_plan_walks_stop_at_16():
    from duet.scientist import plan

    assert list(plan._walk(nest(5, 16))) == [5]
    assert list(plan._walk(nest(5, 17))) == []
    assert list(plan._walk([1, (2, {"a": 3}), [nest(4, 16)]])) == [1, 2, 3]
    rec = types.SimpleNamespace()
    assert plan._template(nest(1, 16), rec, []) == nest(1, 16)
    with pytest.raises(NotAllowed, match="a plan's result is nested too deeply"):
        plan._template(nest(1, 17), rec, [])
    outs = plan._template((plan._Out(0), [plan._Out(1)]), rec, [])  # not pointers: kept as they are
    # _fill walks what _template made, which is never deeper than 16.
    assert plan._fill(plan._template(nest(outs, 14), rec, []), ["a", "b"]) == nest(("a", ["b"]), 14)


# -- the shared walker ---------------------------------------------------------------------------------


def test_leaves_in_order_and_the_limit():
    value = [1, (2, {"a": 3, "b": [4]}), {"c": (5,)}, []]
    assert list(containers.leaves(value)) == [1, 2, 3, 4, 5]
    assert list(containers.leaves(7)) == [7]
    assert list(containers.leaves(nest(1, containers.MAX_DEPTH))) == [1]
    with pytest.raises(containers.TooDeep, match="nested deeper than 16 levels") as info:
        list(containers.leaves(nest(1, containers.MAX_DEPTH + 1)))
    assert info.value.max_depth == 16 and isinstance(info.value, ValueError)
    with pytest.raises(KeyError):
        list(containers.leaves(nest(1, 3), max_depth=2, too_deep=lambda: KeyError("mine")))
    assert list(containers.leaves([1, nest(2, 3), 3], max_depth=3, prune=True)) == [1, 3]
    assert list(containers.leaves([{"a": 1}, (2,)], is_mapping=containers.never)) == [{"a": 1}, 2]
    assert list(containers.leaves([[1], (2,)], is_sequence=lambda v: isinstance(v, list))) == [1, (2,)]


def test_leaves_depth_counts_every_container():
    # A value at depth n is inside n containers, whatever their kinds.
    mixed = [({"k": [(9,)]},)]  # 9 is at depth 5
    assert list(containers.leaves(mixed, max_depth=5)) == [9]
    with pytest.raises(containers.TooDeep):
        list(containers.leaves(mixed, max_depth=4))
    # An empty container at the limit is fine: nothing in it is deeper.
    assert list(containers.leaves(nest([], 4), max_depth=4)) == []


def test_map_leaves_copies_the_containers():
    Point = collections.namedtuple("Point", "x y")
    value = [1, Point(2, 3), {"a": (4, [5])}, torch.Size([6])]
    out = containers.map_leaves(value, lambda v: v * 10)
    assert out == [10, (20, 30), {"a": (40, [50])}, (60,)]
    assert type(out[1]) is tuple and type(out[3]) is tuple and type(out[2]["a"][1]) is list
    assert containers.map_leaves(value, lambda v: v) is not value
    with pytest.raises(containers.TooDeep):
        containers.map_leaves(nest(1, 3), str, max_depth=2)
    deep = nest(1, 3)
    pruned = containers.map_leaves([1, deep], str, max_depth=3, prune=True)
    assert pruned[0] == "1" and innermost(pruned[1]) == 1  # kept as it was, unmapped
    assert containers.map_leaves([Point(1, 2)], str, is_sequence=lambda v: type(v) in (list, tuple)) == ["Point(x=1, y=2)"]


def test_walk_visits_with_the_depth_limit():
    def total(v, inner):
        if isinstance(v, (list, tuple)):
            return sum(inner(x) for x in v)
        if isinstance(v, slice):
            return inner(v.start) + inner(v.stop)
        return v

    assert containers.walk([1, (2, [3]), slice(4, 5)], total) == 15
    assert containers.walk(nest(1, 16), total) == 1
    with pytest.raises(containers.TooDeep):
        containers.walk(nest(1, 17), total)
    with pytest.raises(containers.TooDeep):
        containers.walk(nest(slice(1, 2), 16), total)  # a slice's parts are one level deeper
    with pytest.raises(OverflowError):
        containers.walk(nest(1, 3), total, max_depth=2, too_deep=OverflowError)
    assert containers.walk([1, nest(2, 3)], total, max_depth=3, beyond=lambda v: 100) == 101


def test_walks_never_reach_the_recursion_limit():
    import sys

    very_deep = nest(1, sys.getrecursionlimit() * 2)
    for run in (lambda: list(containers.leaves(very_deep)), lambda: containers.map_leaves(very_deep, str),
                lambda: containers.walk(very_deep, lambda v, inner: [inner(x) for x in v] if isinstance(v, list) else v)):
        with pytest.raises(containers.TooDeep):
            run()
    assert list(containers.leaves(very_deep, prune=True)) == []


def test_every_walk_stops_after_max_nodes_however_the_paths_multiply():
    wide = [1, 2, 3, 4]
    for i in range(4):
        wide[i] = wide  # holds itself: 4**16 paths in a list of four slots
    shared = [0] * 2_000
    fan = [shared] * 2_000  # no cycle, 4 million paths
    for value in (wide, fan):
        with pytest.raises(containers.TooLarge, match="more than 2,000,000 values"):
            list(containers.leaves(value, prune=True))
        with pytest.raises(containers.TooLarge):
            containers.map_leaves(value, lambda v: v, prune=True)
        with pytest.raises(containers.TooLarge):
            containers.walk(value, lambda v, inner: [inner(c) for c in v] if isinstance(v, list) else v, beyond=lambda v: v)
    assert sum(1 for _ in containers.leaves([list(range(1000))] * 1000)) == 1_000_000, "a wire-sized value still passes"


def test_a_list_that_holds_itself_fails_the_action_and_the_owner_goes_on(pair):
    """Found in review: `l[i] = l` made any later action on l walk 4**16 paths, hanging the owner's worker."""
    import time

    import duet

    _, scientist = pair
    l = scientist.send([1, 2, 3, 4])
    for i in range(4):
        l[i] = l
    started = time.monotonic()
    failed = scientist.torch.as_tensor(l)
    with pytest.raises(duet.LimitExceeded, match="more than 2,000,000 values"):
        failed.get(timeout=60)
    assert time.monotonic() - started < 30
    assert float(scientist.torch.tensor([1.0]).sum().get(timeout=30)) == 1.0, "still serving"


# -- the short cuts agree with a plain recursive reference, for any nesting --------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_leaf = st.one_of(st.integers(-3, 3), st.none(), st.text(max_size=2), st.builds(Ref, st.integers(0, 9)))
_nested = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.text(max_size=2), inner, max_size=3)),
    max_leaves=24)


def _ref_depth(v):
    """The depth of the deepest value inside v (an empty container holds none)."""
    items = list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else []
    return 1 + max(_ref_depth(x) for x in items) if items else 0


def _ref_leaves(v):
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _ref_leaves(item)]
    if isinstance(v, dict):
        return [x for item in v.values() for x in _ref_leaves(item)]
    return [v]


def _ref_map(v, fn):
    if isinstance(v, list):
        return [_ref_map(x, fn) for x in v]
    if isinstance(v, tuple):
        return tuple(_ref_map(x, fn) for x in v)
    if isinstance(v, dict):
        return {k: _ref_map(x, fn) for k, x in v.items()}
    return fn(v)


@settings(max_examples=300, deadline=None)
@given(_nested, st.integers(0, 4))
def test_leaves_map_leaves_and_walk_agree_with_the_reference(value, max_depth):
    fits = _ref_depth(value) <= max_depth

    def mark(v):
        return ("m", v)

    def count(v, inner):
        if isinstance(v, (list, tuple)):
            return sum(inner(x) for x in v)
        if isinstance(v, dict):
            return sum(inner(x) for x in v.values())
        return 1

    if fits:
        assert list(containers.leaves(value, max_depth=max_depth)) == _ref_leaves(value)
        out = containers.map_leaves(value, mark, max_depth=max_depth)
        assert out == _ref_map(value, mark)
        assert containers.walk(value, count, max_depth=max_depth) == len(_ref_leaves(value))
        flat = containers.flat_values(value)
        items = list(value.values()) if isinstance(value, dict) else value
        if isinstance(value, (list, tuple, dict)) and not any(isinstance(v, (list, tuple, dict)) for v in items):
            assert list(flat) == _ref_leaves(value)
        else:
            assert flat is None
    else:
        with pytest.raises(containers.TooDeep):
            list(containers.leaves(value, max_depth=max_depth))
        with pytest.raises(containers.TooDeep):
            containers.map_leaves(value, mark, max_depth=max_depth)
        with pytest.raises(containers.TooDeep):
            containers.walk(value, count, max_depth=max_depth)
    refs = []
    from duet.owner.executor import ACTION_ARG_DEPTH, collect_refs
    assert ACTION_ARG_DEPTH > 4
    collect_refs(value, refs)
    assert refs == [v.id for v in _ref_leaves(value) if isinstance(v, Ref)]


def test_a_walk_at_depth_zero_visits_only_the_top():
    assert containers.walk(5, lambda v, inner: v, max_depth=0) == 5
    with pytest.raises(containers.TooDeep):
        containers.walk([5], lambda v, inner: [inner(x) for x in v], max_depth=0)
    with pytest.raises(containers.TooLarge):
        containers.walk(5, lambda v, inner: v, max_nodes=0)
