"""The RequestQueue on its own: submit, decide, rules, expiry, the audit trail, waiting.

Time is a FakeClock the tests move: nothing here waits for expiry.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet.owner.audit import AuditLog
from duet.owner.requests import (
    ACCEPTED,
    CANCELLED,
    DENIED,
    EXPIRED,
    MAX_AMENDMENTS,
    PENDING,
    Request,
    RequestQueue,
    Requester,
    Rule,
)
from tests.clock import FakeClock
from tests.waiting import until

LEE = Requester("Dr. Lee", "SHA256:lee")
EVE = Requester("Dr. Lee", "SHA256:eve")  # the same chosen name, another key
DAY = 24 * 3600


class Decisions:
    """An on_decided callback that remembers what it was called with, and the status it saw."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def __call__(self, req: Request) -> None:
        self.calls.append((req.id, req.status, req.value))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def audit(tmp_path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")


@pytest.fixture
def queue(audit, clock) -> RequestQueue:
    return RequestQueue(audit, clock=clock)


def release(**overrides: Any) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"kind": "release", "requester": LEE, "lineage": ("ages",), "ops": ("Tensor.mean",),
                              "type_name": "Tensor", "shape": (), "dtype": "float32", "numel": 1, "nbytes": 4,
                              "reason": "for the paper", "value": 42.5}
    fields.update(overrides)
    return fields


def events(audit: AuditLog) -> List[str]:
    return [r["event"] for r in audit.read()]


# -- submit and decide --------------------------------------------------------------

def test_a_submitted_request_is_pending_with_the_next_id_and_audited(queue, audit, clock):
    first = queue.submit(release(), Decisions())
    second = queue.submit(release(kind="compute", value=None), Decisions())
    assert (first.id, second.id) == (1, 2)
    assert first.status == PENDING and first.pending and first.decided_at is None
    assert first.created == clock() and first.expires == clock() + DAY
    assert queue.pending == [first, second] and queue.history == [] and len(queue) == 2
    assert queue.get(2) is second and queue[0] is first and list(queue) == [first, second]
    (record, _) = audit.read()
    assert record["event"] == "request" and record["id"] == 1 and record["assets"] == ["ages"]
    assert record["fingerprint"] == LEE.fingerprint and record["reason"] == "for the paper"
    assert "42.5" not in str(record), "the value itself is never audited"


def test_accept_decides_calls_back_once_and_keeps_the_value(queue, audit, clock):
    seen = Decisions()
    req = queue.submit(release(), seen)
    clock.advance(30)
    req.accept()
    assert req.status == ACCEPTED and req.decided_by == "owner" and req.deny_reason == ""
    assert req.decided_at == clock() and not req.pending
    assert seen.calls == [(req.id, ACCEPTED, 42.5)]
    assert req.preview() == 42.5, "accepted: the value stays for the release"
    assert queue.pending == [] and queue.history == [req]
    decision = audit.read()[-1]
    assert decision["event"] == "decision" and decision["request"] == req.id and decision["decision"] == ACCEPTED
    assert decision["by"] == "owner" and decision["scientist"] == "Dr. Lee" and decision["assets"] == ["ages"]


def test_deny_gives_the_reason_and_drops_the_value_after_the_callback(queue, audit):
    seen = Decisions()
    req = queue.submit(release(), seen)
    req.deny("too precise")
    assert req.status == DENIED and req.deny_reason == "too precise"
    assert seen.calls == [(req.id, DENIED, 42.5)], "the callback still sees the request as it was"
    assert req.value is None, "a denied value is not kept"
    assert audit.read()[-1]["reason"] == "too precise"


@pytest.mark.parametrize("status", [EXPIRED, CANCELLED])
def test_other_outcomes_are_decisions_too(queue, status):
    req = queue.submit(release(), Decisions())
    queue.decide(req, status, by="session", reason="gone")
    assert req.status == status and req.deny_reason == "gone" and req.value is None and queue.history == [req]


def test_a_request_is_decided_only_once(queue, audit):
    seen = Decisions()
    req = queue.submit(release(), seen)
    req.deny("no")
    for again in (req.accept, lambda: req.deny("changed my mind"), lambda: queue.decide(req, EXPIRED, by="expiry")):
        with pytest.raises(ValueError, match=f"request #{req.id} was already denied"):
            again()
    assert req.status == DENIED and req.deny_reason == "no"
    assert len(seen.calls) == 1 and events(audit).count("decision") == 1


def test_a_request_outside_a_queue_cannot_be_decided():
    req = Request(id=1, kind="release", requester=LEE)
    with pytest.raises(RuntimeError, match="not in a queue"):
        req.accept()
    assert req.status == PENDING


def test_amending_the_reason_is_audited_and_bounded(queue, audit):
    req = queue.submit(release(), Decisions())
    queue.amend_reason(req, "for the paper")  # the same words: nothing happens
    assert req.amendments == 0 and "reason" not in events(audit)
    for i in range(MAX_AMENDMENTS + 5):
        queue.amend_reason(req, f"reason {i}")
    assert req.amendments == MAX_AMENDMENTS and req.reason == f"reason {MAX_AMENDMENTS - 1}"
    amended = [r for r in audit.read() if r["event"] == "reason"]
    assert len(amended) == MAX_AMENDMENTS
    assert amended[0]["before"] == "for the paper" and amended[0]["after"] == "reason 0"
    req.accept()
    other = queue.submit(release(), Decisions())
    other.deny()
    queue.amend_reason(other, "please")
    assert other.reason == "for the paper", "a decided request keeps its reason"


# -- rules -----------------------------------------------------------------------------

def test_a_matching_rule_decides_at_submit_before_submit_returns(queue, audit):
    rule = queue.add_handler(action="accept", datasets=["ages"], max_elements=10)
    seen = Decisions()
    req = queue.submit(release(), seen)
    assert req.status == ACCEPTED and seen.calls == [(req.id, ACCEPTED, 42.5)]
    assert req.decided_by == f"rule: {rule.describe()}" == "rule: accept release of ages only up to 10 elements"
    assert events(audit) == ["rule_added", "request", "decision"]


def test_a_deny_rule_gives_its_reason(queue):
    queue.add_handler(action="deny", kind=["release", "compute"], scientist=EVE.fingerprint, reason="not you")
    denied = queue.submit(release(requester=EVE), Decisions())
    kept = queue.submit(release(), Decisions())  # same chosen name, other key: the rule does not apply
    assert denied.status == DENIED and denied.deny_reason == "not you"
    assert kept.pending


def test_a_new_rule_decides_pending_requests_it_matches_and_no_others(queue):
    small = queue.submit(release(numel=5), Decisions())
    large = queue.submit(release(numel=5000), Decisions())
    other_asset = queue.submit(release(lineage=("ages", "diagnoses")), Decisions())
    join = queue.submit({"kind": "join", "requester": LEE}, Decisions())
    queue.add_handler(action="accept", datasets=["ages"], max_elements=100)
    assert small.status == ACCEPTED
    assert queue.pending == [large, other_asset, join]


def test_a_removed_rule_decides_nothing_more(queue, audit):
    rule = queue.add_handler(action="accept")
    assert queue.rules == [rule]
    queue.remove_handler(rule)
    assert queue.rules == [] and queue.submit(release(), Decisions()).pending
    assert events(audit)[-2:] == ["rule_removed", "request"]


def test_the_first_matching_rule_wins(queue):
    queue.add_handler(action="deny", datasets=["ages"], reason="first")
    queue.add_handler(action="accept")
    assert queue.submit(release(), Decisions()).deny_reason == "first"
    assert queue.submit(release(lineage=("weights",)), Decisions()).status == ACCEPTED


@pytest.mark.parametrize("kwargs, message", [
    ({"action": "maybe"}, "action must be 'accept' or 'deny'"),
    ({"kind": "download"}, "unknown request kind 'download'"),
    ({"kind": ["release", "everything"]}, "unknown request kind 'everything'"),
    ({"max_elements": -1}, "max_elements must be a non-negative int"),
    ({"max_elements": 1.5}, "max_elements must be a non-negative int"),
])
def test_malformed_rules_are_refused_and_not_added(queue, audit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        queue.add_handler(**kwargs)
    assert queue.rules == [] and audit.read() == []


NAMES = st.sampled_from(["ages", "weights", "labels", "notes"])
LINEAGES = st.frozensets(NAMES, max_size=4)
KIND = st.sampled_from(["join", "release", "compute"])
TEXT = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(lineage=LINEAGES, allowed=st.one_of(st.none(), LINEAGES), numel=st.one_of(st.none(), st.integers(0, 10**6)),
       limit=st.one_of(st.none(), st.integers(0, 10**6)), kind=KIND, kinds=st.frozensets(KIND, min_size=1),
       who=st.sampled_from([LEE, EVE]), only=st.sampled_from([None, LEE.fingerprint, EVE.fingerprint]))
def test_a_rule_matches_exactly_when_every_condition_it_names_holds(lineage, allowed, numel, limit, kind, kinds, who,
                                                                     only):
    rule = Rule("accept", kinds=tuple(kinds), datasets=None if allowed is None else tuple(allowed), max_elements=limit,
                scientist=only)
    req = Request(id=1, kind=kind, requester=who, lineage=tuple(sorted(lineage)), numel=numel)
    expected = (kind in kinds
                and (allowed is None or lineage <= allowed)
                and (limit is None or (numel is not None and numel <= limit))
                and (only is None or who.fingerprint == only))
    assert rule.matches(req) == expected


@settings(max_examples=100, deadline=None)
@given(name=TEXT, reason=TEXT, type_name=TEXT, ops=st.lists(TEXT, max_size=3), lineage=LINEAGES,
       allowed=LINEAGES, kind=KIND)
def test_rules_never_look_at_what_the_scientist_wrote(name, reason, type_name, ops, lineage, allowed, kind):
    """The chosen name, the reason, operation and type labels cannot turn a rule on or off."""
    rule = Rule("accept", kinds=("release", "compute"), datasets=tuple(allowed), max_elements=100)
    plain = Request(id=1, kind=kind, requester=LEE, lineage=tuple(lineage), numel=10)
    worded = Request(id=1, kind=kind, requester=Requester(name, LEE.fingerprint), lineage=tuple(lineage), numel=10,
                     reason=reason, type_name=type_name, ops=tuple(ops))
    assert rule.matches(worded) == rule.matches(plain)


# -- expiry ----------------------------------------------------------------------------

def test_a_request_expires_only_once_its_time_has_come(queue, audit, clock):
    seen = Decisions()
    req = queue.submit(release(), seen)
    clock.advance(DAY - 1)
    assert queue.expire_due() == 0 and req.pending
    clock.advance(1)
    assert queue.expire_due() == 1
    assert req.status == EXPIRED and req.decided_by == "expiry" and "expired" in req.deny_reason
    assert req.decided_at == clock() and req.value is None and seen.calls == [(req.id, EXPIRED, 42.5)]
    assert audit.read()[-1]["decision"] == EXPIRED
    clock.advance(DAY)
    assert queue.expire_due() == 0, "an expired request is not expired again"


def test_an_explicit_now_overrides_the_clock(queue, clock):
    req = queue.submit(release(), Decisions())
    assert queue.expire_due(now=clock() + DAY - 1) == 0 and req.pending
    assert queue.expire_due(now=clock() + DAY) == 1 and req.status == EXPIRED


def test_a_request_s_own_expiry_is_kept(queue, clock):
    soon = queue.submit(release(expires=clock() + 5), Decisions())
    later = queue.submit(release(), Decisions())
    clock.advance(5)
    assert queue.expire_due() == 1 and soon.status == EXPIRED and later.pending


def test_without_a_default_expiry_requests_wait_forever(audit, clock):
    queue = RequestQueue(audit, default_expiry=None, clock=clock)
    req = queue.submit(release(), Decisions())
    assert req.expires is None
    clock.advance(10 * 365 * DAY)
    assert queue.expire_due() == 0 and req.pending


def test_decided_requests_do_not_expire(queue, clock):
    req = queue.submit(release(), Decisions())
    req.accept()
    clock.advance(2 * DAY)
    assert queue.expire_due() == 0 and req.status == ACCEPTED


def test_the_default_clock_is_the_wall_clock(audit):
    import time

    queue = RequestQueue(audit)
    before = time.time()
    req = queue.submit(release(), Decisions())
    assert before <= req.created <= time.time() and req.expires == req.created + DAY


@settings(max_examples=100, deadline=None)
@given(offsets=st.lists(st.integers(0, 100), min_size=1, max_size=8), expiry=st.integers(1, 50),
       later=st.integers(0, 200))
def test_expire_due_expires_exactly_the_requests_past_their_time(offsets, expiry, later):
    clock = FakeClock(0.0)
    queue = RequestQueue(AuditLog(None), default_expiry=expiry, clock=clock)
    reqs = []
    for dt in sorted(offsets):
        clock.advance(dt - clock())
        reqs.append(queue.submit(release(), Decisions()))
    now = clock() + later
    due = [r for r in reqs if r.created + expiry <= now]
    assert queue.expire_due(now) == len(due)
    assert [r.status for r in reqs] == [EXPIRED if r in due else PENDING for r in reqs]


# -- waiting and listening --------------------------------------------------------------

def test_wait_pending_returns_at_once_and_times_out_at_once(queue):
    with pytest.raises(TimeoutError, match="no pending compute request arrived within 0 s"):
        queue.wait_pending(0, kind="compute")
    join = queue.submit({"kind": "join", "requester": LEE}, Decisions())
    assert queue.wait_pending(0) is join
    with pytest.raises(TimeoutError):
        queue.wait_pending(0, kind="compute")  # a pending join is not a compute request


def test_wait_pending_wakes_for_a_request_submitted_from_another_thread(queue):
    queue.submit({"kind": "join", "requester": LEE}, Decisions())
    submitted: List[Request] = []
    thread = threading.Thread(target=lambda: submitted.append(queue.submit(release(kind="compute"), Decisions())))
    thread.start()
    found = queue.wait_pending(30, kind="compute")
    thread.join(30)
    assert submitted == [found] and found.kind == "compute"


def test_wait_changed_wakes_on_a_change(queue):
    """The waiter has a long timeout; it must come back because the queue changed, not because time passed."""
    woke = threading.Event()

    def waiter() -> None:
        queue.wait_changed(120)
        woke.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()

    def changed_and_woken() -> bool:
        # The waiter may not be waiting yet when a change happens: keep changing until it wakes.
        queue.submit(release(), Decisions())
        return woke.wait(0.05)

    until(changed_and_woken, 10, "wait_changed returning after a change")
    thread.join(10)
    assert not thread.is_alive()


def test_listeners_hear_every_change_and_a_broken_one_breaks_nothing(queue):
    heard: List[int] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    queue.subscribe(broken)
    queue.subscribe(lambda: heard.append(len(queue.pending)))
    req = queue.submit(release(), Decisions())
    assert heard == [1]
    rule = queue.add_handler(action="deny", kind="compute")
    queue.remove_handler(rule)
    assert len(heard) == 3
    req.accept()
    assert req.status == ACCEPTED and heard[-1] == 0


def test_the_queue_shows_pending_requests_and_rules_without_values(queue):
    queue.add_handler(action="accept", kind="join")
    req = queue.submit(release(reason="trust me"), Decisions())
    text = repr(queue)
    assert "Pending requests (1)" in text and "“trust me” (their words)" in text
    assert "Rules: accept join" in text and "42.5" not in text
    assert "Request #1" in repr(req) and "42.5" not in repr(req)
    req.deny()
    assert "Pending requests (0)" in repr(queue)
