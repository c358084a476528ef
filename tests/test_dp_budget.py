"""Budgets through the whole stack: the original Duet's budget bugs as invariants, concurrency,
rules, refunds, and what a scientist sees of their own budget."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import duet
from duet.errors import BudgetExceeded
from duet.owner.privacy import facts, mechanisms

AGES = torch.tensor([31.0, 45.0, 52.0, 29.0, 70.0, 18.0])


@pytest.fixture
def dp_pair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    owner.store.add(AGES.clone(), name="ages", bounds=(0, 120))
    yield owner, scientist
    scientist.close()
    owner.close()


def _rows(lo: list, hi: list, n: int) -> facts.Rows:
    return facts.Rows(asset=None, axis=0, shape=(n, len(lo)), lo=np.array([lo], dtype=float), hi=np.array([hi], dtype=float),
                      nan=False, integral=False, step=facts.Step(lambda: None), ops=("x",), exemplar=np.zeros((1, len(lo))))


_bounds = st.lists(st.tuples(st.floats(-100, 100), st.floats(0, 100)), min_size=1, max_size=4).map(
    lambda pairs: ([a for a, _ in pairs], [a + w for a, w in pairs]))
_kinds = st.sampled_from(["sum", "nansum", "mean", "count_nonzero"])


@settings(max_examples=200, deadline=None)
@given(_bounds, _kinds, st.integers(1, 10_000), st.floats(0.01, 10), st.floats(0.01, 10))
def test_less_noise_never_costs_less(bounds, kind, n, e1, e2):
    low, high = sorted((e1, e2))
    fact = facts.Aggregate(rows=_rows(*bounds, n), kind=kind, dims=(0,), form=np.zeros(len(bounds[0])))
    p_low, p_high = mechanisms.plan(fact, low), mechanisms.plan(fact, high)
    # The charge is the epsilon asked for; the smaller one buys at least as much noise.
    assert (p_low.epsilon, p_high.epsilon) == (low, high)
    assert p_low.public().get("noise_std", 0) >= p_high.public().get("noise_std", 0) * (1 - 1e-9)


@settings(max_examples=100, deadline=None)
@given(_bounds, _kinds, st.integers(1, 1000), st.floats(0.05, 5))
def test_the_plan_follows_from_declared_facts_only(bounds, kind, n, epsilon):
    """The same declared facts give the same mechanism, whatever the data: even no rows at all."""
    fact = facts.Aggregate(rows=_rows(*bounds, n), kind=kind, dims=(0,), form=np.zeros(len(bounds[0])))
    empty = facts.Aggregate(rows=_rows(*bounds, 0), kind=kind, dims=(0,), form=np.zeros(len(bounds[0])))
    plan = mechanisms.plan(fact, epsilon)
    assert plan == mechanisms.plan(fact, epsilon)
    if kind != "mean":  # a mean of no rows is refused (the row count is public)
        assert mechanisms.plan(empty, epsilon) == plan


def test_a_query_on_empty_data_costs_the_same(dp_pair):
    owner, s = dp_pair
    owner.store.add(torch.zeros(0), name="nobody", bounds=(0, 120))
    owner.privacy.budget(epsilon=1.0)
    owner.requests.add_handler(action="accept", dp=True)
    s.store["nobody"].sum().get(dp=0.4, timeout=10)
    s.store["ages"].sum().get(dp=0.4, timeout=10)
    assert [r["charge"] for r in s.privacy.releases] == ["epsilon 0.4", "epsilon 0.4"]
    with pytest.raises(BudgetExceeded):
        s.store["ages"].sum().get(dp=0.4, timeout=10)


def test_the_budget_is_never_exceeded_by_50_concurrent_releases(dp_pair):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=1.0)
    owner.requests.add_handler(action="accept", dp=True)
    totals = [s.store["ages"].sum() for _ in range(50)]  # (one pointer asked twice shares one request)
    start = threading.Barrier(50)
    got, refused, other = [], [], []

    def ask(total: duet.Pointer) -> None:
        start.wait(timeout=30)
        try:
            got.append(total.request(dp=0.15).wait(30))
        except BudgetExceeded:
            refused.append(1)
        except Exception as exc:  # pragma: no cover - reported below
            other.append(exc)

    threads = [threading.Thread(target=ask, args=(t,)) for t in totals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not other and (len(got), len(refused)) == (6, 44)
    assert s.privacy.spent == pytest.approx(0.9) and owner.privacy.ledger.spent(s.identity.fingerprint)[0] <= 1.0


def test_over_budget_is_refused_before_anything_is_computed_or_queued(dp_pair, tmp_path):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=0.5)
    ledger_file = owner.privacy.ledger.path
    before = ledger_file.read_bytes() if ledger_file.exists() else b""
    with pytest.raises(BudgetExceeded, match="over your budget"):
        s.store["ages"].mean().get(dp=0.6, timeout=10)
    assert (ledger_file.read_bytes() if ledger_file.exists() else b"") == before
    assert not owner.requests.pending and not owner.requests.history


def test_no_budget_no_dp_release(dp_pair):
    _owner, s = dp_pair
    with pytest.raises(BudgetExceeded, match="no privacy budget"):
        s.store["ages"].mean().get(dp=0.1, timeout=10)
    assert "No privacy budget" in repr(s.privacy)


def test_without_a_rule_the_owner_decides_and_a_denial_refunds(dp_pair):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=1.0)
    handle = s.store["ages"].mean().request(reason="mean age", dp=0.5)
    req = owner.requests.wait_pending(timeout=10)
    assert req.dp_epsilon == 0.5 and "DP, ε 0.5" in repr(req)
    assert s.privacy.spent == pytest.approx(0.5)  # reserved while it waits
    req.deny("not today")
    with pytest.raises(duet.RequestDenied, match="not today"):
        handle.wait(10)
    assert s.privacy.spent == 0.0
    handle = s.store["ages"].mean().request(dp=0.5)
    owner.requests.wait_pending(timeout=10).accept()
    value = handle.wait(10)
    assert isinstance(value, torch.Tensor) and handle.charge["epsilon"] == 0.5
    assert "charged ε 0.5" in handle.charge_text() and s.privacy.spent == pytest.approx(0.5)


def test_a_dp_rule_releases_nothing_exact_and_an_exact_rule_can_release_both(dp_pair):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=2.0)
    owner.requests.add_handler(action="accept", dp=True)
    mean = s.store["ages"].mean()
    exact = mean.request(reason="exact, please")
    assert owner.requests.wait_pending(timeout=10).dp_epsilon is None  # waits for the owner
    assert mean.get(dp=1.0, timeout=10) is not None  # goes out at once
    assert exact.status == "pending"
    owner.requests.add_handler(action="deny", dp=False, reason="exact values stay here")
    with pytest.raises(duet.RequestDenied, match="stay here"):
        exact.wait(10)


def test_a_timed_out_dp_get_waits_for_the_same_request_charged_once(dp_pair):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=1.0)
    mean = s.store["ages"].mean()
    with pytest.raises(duet.RequestTimeout):
        mean.get(dp=0.5, timeout=0.2)
    assert len(owner.requests.pending) == 1
    handle = mean.request(dp=0.5)  # the same request
    owner.requests.pending[0].accept()
    handle.wait(10)
    assert s.privacy.spent == pytest.approx(0.5) and len(owner.requests.history) == 1


def test_a_public_value_is_not_released_with_noise(dp_pair):
    s = dp_pair[1]
    with pytest.raises(duet.NotAllowed, match="not private"):
        s.torch.tensor([1.0, 2.0]).sum().get(dp=0.5, timeout=10)
    with pytest.raises(ValueError, match="epsilon"):
        s.store["ages"].mean().get(dp=-1)


def test_the_audit_log_records_each_charge_and_release(dp_pair):
    owner, s = dp_pair
    owner.privacy.budget(epsilon=1.0)
    owner.requests.add_handler(action="accept", dp=True)
    s.store["ages"].mean().get(dp=0.25, timeout=10)
    events = owner.audit.read()
    charge = next(e for e in events if e["event"] == "dp_charge")
    release = next(e for e in events if e["event"] == "release" and e.get("dp_epsilon"))
    assert charge["fingerprint" if "fingerprint" in charge else "scientist"] == s.identity.fingerprint
    assert release["dp_epsilon"] == 0.25 and release["assets"] == ["ages"]
