"""The privacy ledger: the known budget bug classes as invariants (hypothesis), concurrency, restart."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings, strategies as st

from duet.errors import BudgetExceeded
from duet.owner.privacy.ledger import DEFAULT_KEY, Budget, Ledger, Spend, compose

KEY = "SHA256:" + "a" * 43
_eps = st.floats(0.01, 2.0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(_eps, max_size=8), _eps, _eps)
def test_less_noise_never_costs_less(others, a, b):
    low, high = sorted((a, b))  # a larger epsilon is less noise
    assert compose([Spend.laplace(e) for e in others] + [Spend.laplace(low)], 0)[0] \
        <= compose([Spend.laplace(e) for e in others] + [Spend.laplace(high)], 0)[0]


@settings(max_examples=8, deadline=None)
@given(st.lists(_eps, min_size=1, max_size=6), st.randoms())
def test_the_charge_does_not_depend_on_query_order(eps, rnd):
    spends = [Spend.laplace(e) for e in eps] + [Spend.dpsgd(0.01, 1.2, 100)]
    shuffled = list(spends)
    rnd.shuffle(shuffled)
    assert compose(spends, 1e-5) == compose(shuffled, 1e-5)
    pure = [s for s in spends if s.pure]
    assert compose(pure, 0) == compose(list(reversed(pure)), 0)


def test_over_budget_is_refused_before_anything_is_charged(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.set_budget(DEFAULT_KEY, Budget(1.0))
    ledger.reserve(KEY, Spend.laplace(0.6), "first").commit()
    before = (tmp_path / "l.jsonl").read_bytes()
    with pytest.raises(BudgetExceeded, match="0.4 is left"):
        ledger.reserve(KEY, Spend.laplace(0.5), "second")
    assert (tmp_path / "l.jsonl").read_bytes() == before
    assert ledger.spent(KEY) == (0.6, 0.0)


def test_no_budget_means_no_dp_release_and_dpsgd_needs_delta(tmp_path):
    ledger = Ledger(None)
    with pytest.raises(BudgetExceeded, match="no privacy budget"):
        ledger.reserve(KEY, Spend.laplace(0.1), "x")
    ledger.set_budget(KEY, Budget(5.0))
    with pytest.raises(BudgetExceeded, match="delta > 0"):
        ledger.reserve(KEY, Spend.dpsgd(0.01, 1.0, 10), "train")


def test_a_refund_gives_the_budget_back_and_an_open_reservation_counts(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.set_budget(KEY, Budget(1.0))
    r = ledger.reserve(KEY, Spend.laplace(0.7), "denied later")
    with pytest.raises(BudgetExceeded):
        ledger.reserve(KEY, Spend.laplace(0.7), "while the first is open")
    r.refund()
    ledger.reserve(KEY, Spend.laplace(0.7), "after the refund")  # left open, as if the owner crashed
    restarted = Ledger(tmp_path / "l.jsonl")
    restarted.set_budget(KEY, Budget(1.0))
    assert restarted.spent(KEY) == (0.7, 0.0)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(_eps, st.sampled_from(["commit", "refund", "open"])), max_size=10))
def test_the_ledger_is_identical_after_a_restart(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("ledger") / "l.jsonl"
    ledger = Ledger(path)
    ledger.set_budget(KEY, Budget(100.0, 1e-6))
    for eps, op in ops:
        r = ledger.reserve(KEY, Spend.laplace(eps), f"q{eps}")
        if op != "open":
            getattr(r, op)()
    again = Ledger(path)
    again.set_budget(KEY, Budget(100.0, 1e-6))
    assert again.spent(KEY) == ledger.spent(KEY)
    assert [(e.id, e.spend, e.state) for e in again.spends_of(KEY)] == [(e.id, e.spend, e.state) for e in ledger.spends_of(KEY)]


def test_a_cut_short_last_line_is_ignored_and_a_corrupt_middle_refuses_to_start(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.set_budget(KEY, Budget(5.0))
    ledger.reserve(KEY, Spend.laplace(1.0), "a").commit()
    with open(path, "a") as f:
        f.write('{"op": "reserve", "id": "x')  # the crash came mid-write
    assert Ledger(path).spends_of(KEY)[0].spend.epsilon == 1.0
    with open(path, "a") as f:
        f.write('\n{"op": "committed", "id": "y"}\n')
    with pytest.raises(ValueError, match="cannot be read"):
        Ledger(path)


def test_budget_is_never_exceeded_under_50_concurrent_requests(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.set_budget(KEY, Budget(1.0))
    start = threading.Barrier(50)
    granted, refused = [], []

    def ask() -> None:
        start.wait(timeout=30)
        try:
            granted.append(ledger.reserve(KEY, Spend.laplace(0.15), "concurrent"))
        except BudgetExceeded:
            refused.append(1)

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(granted) == 6 and len(refused) == 44
    assert ledger.spent(KEY)[0] <= 1.0
    assert Ledger(tmp_path / "l.jsonl").spends_of(KEY).__len__() == 6


def test_bad_epsilons_are_refused():
    for bad in (0, -1, float("nan"), float("inf"), True, 11.0):
        with pytest.raises(ValueError):
            Spend.laplace(bad)


def test_owner_privacy_keeps_its_ledger_beside_the_audit_log_across_a_restart(tmp_path):
    import duet

    audit = tmp_path / "audit.jsonl"
    owner = duet.Owner(audit_log=audit)
    try:
        owner.privacy.budget(epsilon=2.0)
        owner.privacy.ledger.reserve(KEY, Spend.laplace(0.5), "mean of ages").commit()
        assert "0.5" in repr(owner.privacy) and "<table" in owner.privacy._repr_html_()
    finally:
        owner.close()
    again = duet.Owner(audit_log=audit)
    try:
        again.privacy.budget(epsilon=2.0)
        assert again.privacy.summary(KEY)["left_epsilon"] == pytest.approx(1.5)
        assert any(e["event"] == "dp_charge" for e in again.audit.read())
        with pytest.raises(ValueError, match="fingerprint"):
            again.privacy.budget("alice", epsilon=1.0)
    finally:
        again.close()
