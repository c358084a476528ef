"""Sensitivity from declared facts: which steps keep bounds, which drop them, and the properties
the noise relies on (hypothesis): bounds contain every value, one replaced row moves an exact
sum by at most the planned sensitivity, and what the scientist sees of facts never depends on
the data."""
from __future__ import annotations

import itertools
from typing import Any, List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import duet
from duet.owner.privacy import facts, mechanisms

LO = np.array([-5.0, 0.0])
HI = np.array([5.0, 10.0])
_names = itertools.count()


@pytest.fixture(scope="module")
def dp_pair(tmp_path_factory):
    owner, scientist = duet.local_pair(audit_log=tmp_path_factory.mktemp("dp") / "audit.jsonl")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0, 70.0, 18.0]), name="ages", bounds=(0, 120))
    vitals = np.array([[52.0, 27.5, 120.0], [np.nan, 31.0, 140.0], [40.0, np.nan, 118.0], [61.0, 22.0, 131.0]])
    owner.store.add(vitals, name="vitals", bounds=[(0, 120), (10, 60), (60, 250)], missing=True)
    owner.store.add(torch.tensor([1, 3, 0, 2, 3, 1]), name="visits", bounds=(0, 10))
    owner.store.add(torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0]), name="other", bounds=(0, 20))
    owner.store.add(torch.tensor([1.0, 2.0]), name="no bounds")
    owner.privacy.budget(epsilon=1000.0)
    owner.requests.add_handler(action="accept", dp=True)
    yield owner, scientist
    scientist.close()
    owner.close()


def fact_of(pair: Tuple[duet.Owner, duet.Scientist], ptr: Any) -> Any:
    owner, scientist = pair
    scientist.ping()
    return owner.scientists[0].objects.get(ptr.id).dp


def dp_info(ptr: Any) -> dict:
    return ptr.meta()["dp"]


# -- which steps keep a fact --------------------------------------------------------------------
def test_bounds_follow_elementwise_steps_to_an_aggregate(dp_pair):
    _owner, s = dp_pair
    ages = s.store["ages"]
    m = ((ages.clamp(18, 90) - 18) * 2).mean()
    assert dp_info(m) == {"available": True, "asset": "ages", "bounds": [0.0, 144.0], "may_be_nan": False, "kind": "mean"}
    exact = ((torch.tensor([31.0, 45.0, 52.0, 29.0, 70.0, 18.0]).clamp(18, 90) - 18) * 2).mean()
    noisy = m.get(dp=10.0, timeout=10)  # the largest epsilon per release: noise std 144 / 6 / 10 * sqrt(2) ≈ 3.4
    assert isinstance(noisy, torch.Tensor) and noisy.dtype == torch.float32 and noisy.shape == ()
    assert abs(float(noisy) - float(exact)) < 30  # over 8 standard deviations


def test_counts_comparisons_and_where_are_integers_with_small_sensitivity(dp_pair):
    _owner, s = dp_pair
    ages = s.store["ages"]
    count = (ages > 40).sum()
    fact = fact_of(dp_pair, count)
    plan = mechanisms.plan(fact, 1.0)
    assert (plan.grid, plan.sensitivity) == (1.0, 1)  # a replaced row changes a count by one
    assert count.get(dp=1.0, timeout=10).dtype == torch.int64
    weights = s.torch.where(ages > 60, s.torch.tensor(1.0), s.torch.tensor(0.5)).sum()
    assert dp_info(weights)["bounds"] == [0.5, 1.0]  # the union of the choices' bounds
    assert dp_info(s.torch.where(ages > 60, s.torch.tensor(60.0), ages).sum())["bounds"] == [0.0, 120.0]


def test_columns_of_a_table_keep_their_own_bounds(dp_pair):
    _owner, s = dp_pair
    vitals = s.store["vitals"]
    bmi = s.numpy.nan_to_num(vitals[:, 1], nan=25.0)
    fact = fact_of(dp_pair, bmi)
    assert (fact.lo.tolist(), fact.hi.tolist(), fact.nan) == ([10.0], [60.0], False)
    total = s.numpy.nansum(vitals, axis=0)
    plan = mechanisms.plan(fact_of(dp_pair, total), 1.0)
    # Each column's width, from 0: a missing value counts as 0, so a row can move from 250 to nothing.
    assert plan.public()["sensitivity"] == pytest.approx(120 + 60 + 250, rel=1e-3)
    released = total.get(dp=10.0, timeout=10)
    assert isinstance(released, np.ndarray) and released.shape == (3,)


def test_missing_values_must_be_dealt_with_before_a_sum(dp_pair):
    _owner, s = dp_pair
    vitals = s.store["vitals"]
    with pytest.raises(duet.NotAllowed, match="missing"):
        s.numpy.sum(vitals, axis=0).get(dp=1.0, timeout=10)
    assert dp_info(s.numpy.mean(s.numpy.nan_to_num(vitals, nan=0.0), axis=0))["available"]
    count = s.numpy.count_nonzero(s.numpy.isfinite(vitals), axis=0)
    assert dp_info(count)["available"] and dp_info(count)["bounds"] == [0.0, 1.0]


@pytest.mark.parametrize("program, why", [
    (lambda s, a: a[:3].sum(), "selects rows"),
    (lambda s, a: a[s.torch.tensor([0, 2])].sum(), "selects rows"),
    (lambda s, a: (a * s.torch.arange(6.0)).sum(), "differs from row to row"),
    (lambda s, a: (a + s.store["other"]).sum(), "two assets"),
    (lambda s, a: (a + s.store["no bounds"][0]).sum(), "no declared bounds"),
    (lambda s, a: a.exp().sum(), "the bounds would"),
    (lambda s, a: a.sort()[0].sum(), "no rule"),
    (lambda s, a: (a - a.mean()).sum(), "aggregate"),
    (lambda s, a: a.mean().sqrt(), "after an aggregate"),
    (lambda s, a: a.mean() + a.sum(), "release them one by one"),
    (lambda s, a: s.torch.log(a).sum(), "not be finite"),
])
def test_steps_without_a_rule_keep_no_fact_and_say_why(dp_pair, program, why):
    s = dp_pair[1]
    value = program(s, s.store["ages"])
    info = dp_info(value)
    assert not info["available"] and why in info["why"], info
    with pytest.raises(duet.NotAllowed, match="cannot be released with dp="):
        value.get(dp=1.0, timeout=10)


def test_a_write_drops_the_fact_even_through_another_pointer(dp_pair):
    s = dp_pair[1]
    ages = s.store["ages"]
    view = ages[:]  # all rows: a view of the same memory
    assert dp_info(ages.sum())["available"]
    view.add_(1000)  # would push every value far outside the declared bounds
    assert not dp_info(ages.sum())["available"]
    assert "changed in place" in dp_info(ages.sum())["why"]
    arr = s.store["vitals"]
    arr[0, 0] = 1e9  # numpy: a declared write
    assert "changed in place" in dp_info(s.numpy.nansum(arr, axis=0))["why"]


def test_a_release_is_computed_again_from_the_asset_not_from_the_pointer(dp_pair):
    """Even a write the facts missed could not move a released value: it never reads the pointer."""
    owner, s = dp_pair
    ages = s.store["ages"]
    total = ages.sum()
    fact = fact_of(dp_pair, total)
    owner.scientists[0].objects.get(ages.id).value.fill_(1e6)  # behind the executor's back
    assert float(mechanisms.rows_value(fact.rows).sum()) == pytest.approx(245.0)


def test_a_removed_asset_is_not_released(dp_pair, tmp_path):
    owner, s = dp_pair
    name = f"temp {next(_names)}"
    owner.store.add(torch.ones(4), name=name, bounds=(0, 1))
    total = s.store[name].sum()
    owner.store.remove(name)
    with pytest.raises(duet.NotAllowed, match="removed or replaced"):
        total.get(dp=1.0, timeout=10)


def test_aggregates_take_public_affine_maps(dp_pair):
    s = dp_pair[1]
    m = s.store["ages"].mean()
    shifted = 2.0 - m * 3
    fact = fact_of(dp_pair, shifted)
    assert (fact.scale, fact.shift) == (-3.0, 2.0)
    # noise std: 120 / 6 (one row in the mean) * 3 / epsilon 10 * sqrt(2) ≈ 8.5
    assert abs(float(shifted.get(dp=10.0, timeout=10)) - (2 - 3 * 245 / 6)) < 70


@pytest.mark.parametrize("bounds, kwargs, match", [
    ((0, 50), {}, "outside the declared bounds"),
    ((0, 120), {"privacy_unit": 3}, "axis"),
    ([(0, 1), (0, 2), (0, 3)], {}, "do not fit"),
    ((5, 1), {}, "at most its upper"),
    ((0, float("inf")), {}, "finite"),
])
def test_declarations_are_checked_when_published(dp_pair, bounds, kwargs, match):
    owner = dp_pair[0]
    with pytest.raises(ValueError, match=match):
        owner.store.add(torch.tensor([31.0, 90.0]), name=f"bad {next(_names)}", bounds=bounds, **kwargs)
    with pytest.raises(ValueError, match="missing=True"):
        owner.store.add(np.array([1.0, np.nan]), name=f"bad {next(_names)}", bounds=(0, 2))
    with pytest.raises(ValueError, match="datasets"):
        owner.store.add(torch.ones(3), name=f"bad {next(_names)}", privacy_unit="item")


def test_the_listing_shows_the_declarations(dp_pair):
    s = dp_pair[1]
    text = repr(s.store)
    assert "bounds [0, 120], one row per person" in text and "may be missing" in text
    listing = {a["name"]: a for a in s.store.listing()}
    assert listing["ages"]["dp"]["lo"] == [0.0] and "dp" not in listing["no bounds"]


# -- properties ------------------------------------------------------------------------------------
def _row(draw: Any) -> List[float]:
    return [draw(st.floats(float(a), float(b), allow_nan=False, width=64)) for a, b in zip(LO, HI)]


@st.composite
def datasets(draw: Any) -> Tuple[np.ndarray, np.ndarray]:
    """A table within the bounds, and a neighbour: the same table with one row replaced."""
    n = draw(st.integers(1, 6))
    rows = np.array([_row(draw) for _ in range(n)])
    other = rows.copy()
    other[draw(st.integers(0, n - 1))] = _row(draw)
    return rows, other


STEPS = st.one_of(
    st.tuples(st.just("clamp"), st.floats(-6, 0), st.floats(0.5, 11)),
    st.tuples(st.just("add"), st.floats(-10, 10)),
    st.tuples(st.just("mul"), st.floats(-3, 3)),
    st.tuples(st.just("rsub"), st.floats(-10, 10)),
    st.tuples(st.just("div"), st.sampled_from([-4.0, -0.5, 0.25, 2.0])),
    st.tuples(st.just("abs")), st.tuples(st.just("neg")), st.tuples(st.just("square")), st.tuples(st.just("floor")),
    st.tuples(st.just("where"), st.floats(-5, 10), st.floats(-20, 20)),
    st.tuples(st.just("gt"), st.floats(-5, 10)),
    st.tuples(st.just("maximum"), st.floats(-5, 5), st.floats(-5, 5)),
    st.tuples(st.just("times_self_clamped")),
    st.tuples(st.just("column"), st.integers(0, 1)),
    st.tuples(st.just("sum_columns")),
)
AGGREGATES = st.sampled_from([("sum", 0), ("sum", None), ("mean", 0), ("mean", None), ("count_nonzero", 0)])


def _apply(s: duet.Scientist, x: Any, source: Any, step: tuple) -> Any:
    kind = step[0]
    if kind == "clamp":
        return x.clamp(step[1], step[2])
    if kind == "add":
        return x + step[1]
    if kind == "mul":
        return x * step[1]
    if kind == "rsub":
        return step[1] - x
    if kind == "div":
        return x / step[1]
    if kind == "abs":
        return abs(x)
    if kind == "neg":
        return -x
    if kind == "square":
        return x ** 2
    if kind == "floor":
        return x.floor()
    if kind == "where":
        return s.torch.where(x > step[1], x, s.torch.tensor(step[2], dtype=torch.float64))
    if kind == "gt":
        return (x > step[1]).double()
    if kind == "maximum":
        return s.torch.maximum(x, s.torch.tensor([step[1], step[2]], dtype=torch.float64)[: 1])
    if kind == "times_self_clamped":
        return x * source.clamp(0, 2)[:, :1]
    if kind == "column":
        return x[:, step[1]: step[1] + 1]
    if kind == "sum_columns":
        return x.sum(1, keepdim=True)
    raise AssertionError(kind)


def _program(s: duet.Scientist, name: str, steps: list, aggregate: tuple) -> Tuple[list, Any]:
    source = s.store[name]
    x, seen = source, [source]
    for step in steps:
        x = _apply(s, x, source, step)
        seen.append(x)
    op, dim = aggregate
    out = getattr(x, op)() if dim is None else getattr(x, op)(dim)
    return seen, out


def _publish(owner: duet.Owner, values: np.ndarray) -> str:
    name = f"table {next(_names)}"
    owner.store.add(torch.tensor(values, dtype=torch.float64), name=name, bounds=[(a, b) for a, b in zip(LO, HI)])
    return name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(datasets(), st.lists(STEPS, max_size=5), AGGREGATES)
def test_bounds_hold_and_one_replaced_row_moves_a_sum_by_at_most_the_sensitivity(dp_pair, data, steps, aggregate):
    owner, s = dp_pair
    d, d2 = data
    a, b = _publish(owner, d), _publish(owner, d2)
    seen_a, out_a = _program(s, a, steps, aggregate)
    seen_b, out_b = _program(s, b, steps, aggregate)
    table = owner.scientists[0].objects
    s.ping()
    # What the scientist can see of facts is the same on both datasets (never from the data).
    for pa, pb in zip(seen_a + [out_a], seen_b + [out_b]):
        ma, mb = pa.meta(), pb.meta()
        assert {**ma["dp"], "asset": None} == {**mb["dp"], "asset": None}
        assert {k: v for k, v in ma.items() if k not in ("dp", "assets", "ops")} == \
            {k: v for k, v in mb.items() if k not in ("dp", "assets", "ops")}
    for p in seen_a:  # every value lies within its bounds
        fact, value = table.get(p.id).dp, table.get(p.id).value
        if fact is None:
            continue
        v = value.numpy()
        slack = 1e-9 * (1 + np.abs(fact.hi))
        assert v.shape == fact.shape
        assert np.all((v >= fact.lo - slack) | np.isnan(v)) and np.all((v <= fact.hi + slack) | np.isnan(v))
    fa, fb = table.get(out_a.id).dp, table.get(out_b.id).dp
    assert (fa is None) == (fb is None)
    if not isinstance(fa, facts.Aggregate):
        return
    try:
        plan = mechanisms.plan(fa, 1.0)
    except mechanisms.Unreleasable:
        return
    assert mechanisms.plan(fb, 1.0) == plan  # the charge and the noise depend on declared facts only
    ta = mechanisms.exact_total(fa, plan, mechanisms.rows_value(fa.rows))
    tb = mechanisms.exact_total(fb, plan, mechanisms.rows_value(fb.rows))
    assert int(np.abs(ta.astype(np.int64) - tb.astype(np.int64)).sum()) <= plan.sensitivity


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datasets(), st.integers(1, 12))
def test_a_histogram_moves_by_at_most_its_sensitivity(dp_pair, data, bins):
    owner, s = dp_pair
    d, d2 = data
    queries = [s.dp.histogram(s.store[_publish(owner, x)], bins=bins, range=(-5, 10), epsilon=1.0) for x in (d, d2)]
    fa, fb = (fact_of(dp_pair, q.pointer) for q in queries)
    plan = mechanisms.plan(fa, 1.0)
    assert plan == mechanisms.plan(fb, 1.0) and plan.sensitivity == 2 * 2  # two elements per row
    ta = mechanisms.exact_total(fa, plan, mechanisms.rows_value(fa.rows))
    tb = mechanisms.exact_total(fb, plan, mechanisms.rows_value(fb.rows))
    assert int(np.abs(ta - tb).sum()) <= plan.sensitivity and int(ta.sum()) == d.size


# -- attacks from the review of this design, kept as regressions ----------------------------------------
def test_an_empty_list_of_axes_keeps_no_fact(dp_pair):
    """torch reduces over every axis for dim=(): taken as row-wise, one row would reach every row."""
    s = dp_pair[1]
    ages = s.store["ages"]
    for dims in ((), []):
        m = ages.mean(dim=dims, keepdim=True)
        assert "empty list of axes" in dp_info(m)["why"]
        assert not dp_info(((m - 30) * 1e9).clamp(0, 1) + ages * 0)["available"]


def test_a_public_list_changed_after_the_step_does_not_change_the_replay(dp_pair):
    """A mean over axis 1 with dim=L, then L[0] = 0: the recorded step keeps its own copy of L."""
    owner, s = dp_pair
    name = f"table {next(_names)}"
    data = torch.full((50, 1), 50.0, dtype=torch.float64)
    data[0, 0] = 51.0
    owner.store.add(data, name=name, bounds=(0, 120))
    x = s.store[name]
    dims = s.torch.tensor([1]).tolist()  # a public list on the owner
    m = x.mean(dim=dims, keepdim=True)
    dims[0] = 0  # would make the recorded step average over the rows
    total = (((m - 50.0) * 1e6).clamp(0, 1) + x * 0).sum()
    fact = fact_of(dp_pair, total)
    plan = mechanisms.plan(fact, 1.0)
    exact = mechanisms.exact_total(fact, plan, mechanisms.rows_value(fact.rows))
    assert int(exact) * plan.grid == pytest.approx(1.0)  # only row 0's own bit, as when the fact was made


def test_steps_that_mix_rows_are_caught_before_any_release():
    """Defence in depth: made-up data within the bounds, one row replaced, and only that row may move."""
    owner, s = duet.local_pair()
    try:
        owner.store.add(torch.arange(10.0), name="x", bounds=(0, 10))
        asset = owner.store.get("x")
        rows = facts.from_asset(asset, asset.privacy)
        facts.check_row_wise(rows)  # the asset itself: row-wise
        mixing = facts.Step(lambda v: v.sum(0, keepdim=True).expand_as(v).clone(), (rows.step,))
        with pytest.raises(facts.Refused, match="mixes rows"):
            facts.check_row_wise(facts.Rows(asset=asset, axis=0, shape=(10,), lo=rows.lo, hi=rows.hi * 10, nan=False,
                                            integral=False, step=mixing, ops=("x", "mix"), exemplar=rows.exemplar))
    finally:
        s.close()
        owner.close()


def test_a_cast_that_would_wrap_keeps_no_fact(dp_pair):
    owner, s = dp_pair
    name = f"wide {next(_names)}"
    owner.store.add(torch.tensor([10.0, 150.0, 200.0]), name=name, bounds=(0, 200))
    assert "wrap around" in dp_info(s.store[name].to(torch.int8))["why"]
    assert dp_info(s.store[name].to(torch.int16).sum())["available"]
