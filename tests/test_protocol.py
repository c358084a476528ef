"""The message vocabulary (duet.protocol) and the owner's connection state machine."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, strategies as st

import duet
from duet import protocol
from duet.owner.connection_state import LIVE, TRANSITIONS, ConnState, allowed
from duet.protocol import Msg, RequestKind, error_from_wire, error_to_wire, problem


def test_every_message_type_has_a_field_table_and_no_name_is_spelled_twice():
    assert set(protocol.FIELDS) == protocol.MESSAGE_TYPES - {Msg.INVALID}
    assert len(protocol.MESSAGE_TYPES) == len([k for k in vars(Msg) if k.isupper()])
    assert len(protocol.REQUEST_KINDS) == len([k for k in vars(RequestKind) if k.isupper()])


def test_the_owner_and_the_scientist_handle_every_message_meant_for_them(pair):
    owner, scientist = pair
    conn = owner.scientists[0]
    to_owner = {Msg.REQ, Msg.CALL, Msg.PUT, Msg.FREE, Msg.REASON, Msg.MODEL, Msg.PLAN_DEF, Msg.PLAN_RUN, Msg.EPOCH, Msg.BATCH}
    assert set(conn._handlers) == to_owner
    assert set(conn._request_handlers) == protocol.REQUEST_KINDS
    assert set(scientist._handlers) == {Msg.FAILED, Msg.QUEUED, Msg.WELCOME, Msg.REJECTED, Msg.BYE, Msg.PROGRESS}


@pytest.mark.parametrize("msg, expect", [
    ({"t": "call", "rid": 1, "kind": "func", "name": "torch.add", "args": [], "kwargs": {}}, None),
    ({"t": "call", "rid": None, "kind": "func", "name": "torch.add"}, None),
    ({"t": "call", "rid": True, "kind": "func", "name": "x"}, "field 'rid'"),
    ({"t": "call", "rid": 1, "args": "not a list"}, "field 'args' of a 'call' message has the wrong type (str)"),
    ({"t": "free", "ids": 3}, "field 'ids'"),
    ({"t": "put", "rid": 1, "free": "x"}, "field 'free'"),
    ({"t": "req", "id": 1, "kind": 5}, "field 'kind'"),
    ({"t": "welcome", "pub": "text"}, "field 'pub'"),
    ({"t": "nope"}, "unknown message type 'nope'"),
    ({"t": 3}, "unknown message type 3"),
])
def test_problem_names_the_field_that_is_wrong(msg, expect):
    found = problem(msg)
    assert (found is None) if expect is None else (expect in found)


def test_a_wrongly_typed_field_reaches_the_scientist_as_a_failure_of_that_result(pair):
    owner, scientist = pair
    scientist.session.send({"t": Msg.PUT, "rid": 77, "free": "not a list"})
    scientist.ping()
    err = scientist.failures[77]
    assert isinstance(err, duet.NotAllowed) and "malformed message: field 'free'" in str(err)
    assert float(scientist.torch.tensor([2.0]).sum().get()) == 2.0, "still serving"


@given(st.sampled_from([duet.NotAllowed("no"), duet.LimitExceeded("big"), duet.ProtocolError("p"),
                        duet.ConnectionLost("gone"), duet.RequestDenied("why", 4), duet.RemoteError("op", "ValueError", "d"),
                        ValueError("secret value 42")]), st.text(max_size=20))
def test_errors_cross_the_wire_as_our_own_types_and_foreign_ones_without_their_message(exc, op):
    back = error_from_wire(error_to_wire(exc, op))
    if isinstance(exc, duet.DuetError):
        assert type(back) is type(exc) and str(back) == str(exc)
    else:
        assert isinstance(back, duet.RemoteError) and "42" not in str(back) and back.exc_type == "ValueError"


def test_states_are_strings_where_they_are_shown():
    assert ConnState.ACTIVE == "active" and str(ConnState.SUSPENDED) == "suspended" and f"{ConnState.MERGED}" == "merged"


def test_the_state_machine_ends_in_finished_or_merged_from_everywhere():
    assert TRANSITIONS[ConnState.FINISHED] == frozenset() and TRANSITIONS[ConnState.MERGED] == frozenset()
    for state in ConnState:
        seen, todo = set(), [state]
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(TRANSITIONS[s])
        assert seen & {ConnState.FINISHED, ConnState.MERGED}, state
    assert not allowed(ConnState.FINISHED, ConnState.ACTIVE) and not allowed(ConnState.SUSPENDED, ConnState.ACTIVE)
    assert LIVE == {ConnState.ACTIVE, ConnState.JOINING, ConnState.SUSPENDED, ConnState.RESUMING}


def test_a_transition_the_table_refuses_is_logged_and_not_applied(pair, caplog):
    owner, _ = pair
    conn = owner.scientists[0]
    with caplog.at_level(logging.INFO, logger="duet.owner"):
        assert conn._to(ConnState.RESUMING) is False
    assert conn.state == ConnState.ACTIVE
    assert "ignored active -> resuming" in caplog.text


def test_a_join_decided_after_the_link_closed_changes_nothing(tmp_path):
    """The race the old string states lost: a cancelled join turned a finished connection 'rejected'."""
    owner = duet.launch(name="o", local_only=True, display=False, approve_joins=True, audit_log=tmp_path / "a.jsonl")
    try:
        import threading

        joined = threading.Thread(target=lambda: _join_quietly(owner.code), daemon=True)
        joined.start()
        req = owner.requests.wait_pending(20, kind="join")
        conn = next(c for c in owner._connections if c.state == ConnState.JOINING)
        from duet import runtime

        runtime.run(conn.session.close(), timeout=10)  # the link closes while the join waits
        assert conn.session.wait_closed(10)
        assert req.status == "cancelled"  # by the connection's end, whose cancellation decided it
        assert conn.state == ConnState.FINISHED, "the cancelled join must not turn a finished connection 'rejected'"
        joined.join(40)
        assert not joined.is_alive()
    finally:
        owner.close()


def _join_quietly(code: str) -> None:
    try:
        duet.join(code, name="late", local_only=True, timeout=20, join_approval_timeout=20).close()
    except duet.DuetError:
        pass


@pytest.mark.slow
def test_a_plans_approval_survives_a_dropped_link_and_resume(tmp_path):
    """Actions and plans share one approval wait: only the end of the connection cancels it."""
    from tests.test_resume import _drop, _wait_for

    owner = duet.launch(name="o", local_only=True, display=False, audit_log=tmp_path / "a.jsonl",
                        approve="everything", resume_window=30)
    try:
        owner.store.add(torch.tensor([1.0, 2.0, 3.0]), name="x")
        owner.requests.add_handler(action="accept", kind="release")
        scientist = duet.join(owner.code, name="s", local_only=True)

        @duet.plan
        def double_sum(t):
            return (t * 2).sum()

        out = double_sum(scientist.store["x"])
        req = owner.requests.wait_pending(10, kind="compute")
        assert req.type_name.startswith("plan double_sum")
        _drop(scientist)
        _wait_for(lambda: owner.suspended, 15, owner)
        assert req.pending, "a dropped link must not cancel the plan's approval"
        scientist.resume(timeout=20)
        req.accept()
        assert out.get(timeout=20).item() == 12.0
        scientist.close()
    finally:
        owner.close()
