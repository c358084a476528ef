"""Session on its own, over an in-memory transport pair: no owner, no scientist.

Request/reply matched by id (whatever the order, a hypothesis property), many callers at once,
timeouts, errors to and from the wire, closing, malformed and oversize messages, handlers that
raise. Every wait is on a future, an event or a condition, with a timeout.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet import runtime, wire
from duet.errors import (
    ConnectionLost,
    DuetError,
    LimitExceeded,
    NotAllowed,
    ProtocolError,
    RemoteError,
    RequestDenied,
    RequestTimeout,
    UnknownObject,
)
from duet.session import Session, error_from_wire, error_to_wire
from duet.transport.base import Transport
from duet.transport.memory import memory_pair

T = 10.0  # bound of every wait; a passing test takes milliseconds


class Inbox:
    """A message handler that keeps what it got, and lets a test wait for a count of messages."""

    def __init__(self, respond: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self.messages: List[Dict[str, Any]] = []
        self.respond = respond
        self._cond = threading.Condition()

    def __call__(self, msg: Dict[str, Any]) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()
        if self.respond is not None:
            self.respond(msg)

    def wait_for(self, n: int, timeout: float = T) -> List[Dict[str, Any]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"{len(self.messages)} of {n} messages arrived"
            return list(self.messages)


def _link(limits: wire.Limits = wire.DEFAULT_LIMITS) -> Tuple[Session, Session, Inbox, Inbox]:
    """(caller, server, caller's inbox, server's inbox) over a fresh memory pair."""
    a, b = memory_pair()
    caller, server = Session(a, name="caller", limits=limits), Session(b, name="server")
    mine, theirs = Inbox(), Inbox()
    caller.set_handler(mine)
    server.set_handler(theirs)
    return caller, server, mine, theirs


def _close(session: Session) -> None:
    runtime.run(session.close(), timeout=T, what="closing a session")


@pytest.fixture
def link() -> Iterator[Tuple[Session, Session, Inbox, Inbox]]:
    caller, server, mine, theirs = _link()
    yield caller, server, mine, theirs
    _close(caller)


def _outcome(fut: "concurrent.futures.Future[Any]") -> Any:
    try:
        return fut.result(T)
    except DuetError as exc:
        return exc


# -- request and reply ------------------------------------------------------------------

def test_a_reply_resolves_the_request_with_the_same_id_whatever_the_order(link):
    caller, server, _, inbox = link
    futs = [caller.request({"t": "ask", "n": n}) for n in range(3)]
    got = inbox.wait_for(3)
    assert [m["t"] for m in got] == ["req"] * 3 and [m["n"] for m in got] == [0, 1, 2]
    assert len({m["id"] for m in got}) == 3 and [f.request_id for f in futs] == [m["id"] for m in got]
    for msg in reversed(got):
        server.reply(msg["id"], value={"answer": msg["n"] * 10})
    assert [f.result(T) for f in futs] == [{"answer": 0}, {"answer": 10}, {"answer": 20}]


def test_call_waits_for_its_reply(link):
    caller, server, _, inbox = link
    inbox.respond = lambda msg: server.reply(msg["id"], value=[msg["x"], "seen"])
    assert caller.call({"t": "echo", "x": 7}, timeout=T, what="echo") == [7, "seen"]


def test_a_reply_to_no_pending_request_is_ignored(link):
    caller, server, mine, inbox = link
    fut = caller.request({"t": "ask"})
    (msg,) = inbox.wait_for(1)
    for stray in (msg["id"] + 1000, str(msg["id"]), None, -1):
        server.send({"t": "rep", "id": stray, "ok": True, "value": "stray"})
    server.send({"t": "note"})  # delivered after the strays, in order
    mine.wait_for(1)
    assert not fut.done(), "no stray reply resolved it"
    server.reply(msg["id"], value="mine")
    assert fut.result(T) == "mine"
    server.reply(msg["id"], value="again")  # a second reply to the same id finds nothing pending
    server.send({"t": "note"})
    mine.wait_for(2)
    assert fut.result(0) == "mine"
    assert [m["t"] for m in mine.messages] == ["note", "note"], "replies never reach the message handler"


def test_messages_and_requests_keep_their_order(link):
    caller, _, _, inbox = link
    for i in range(50):
        if i % 5 == 0:
            caller.request({"t": "ask", "i": i})
        else:
            caller.send({"t": "act", "i": i})
    assert [m["i"] for m in inbox.wait_for(50)] == list(range(50))


def test_many_threads_calling_at_once_each_get_their_own_reply(link):
    caller, server, _, inbox = link
    inbox.respond = lambda msg: server.reply(msg["id"], value=msg["who"])

    def calls(thread: int) -> List[Any]:
        return [caller.call({"t": "echo", "who": [thread, k]}, timeout=T, what="echo") for k in range(25)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(calls, range(8)))
    assert results == [[[t, k] for k in range(25)] for t in range(8)]
    assert len({m["id"] for m in inbox.messages}) == 200, "every request had its own id"


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 12))
def test_every_reply_reaches_its_own_caller_whatever_the_interleaving(data, n):
    """Replies in any order, mixed with strays, duplicates and ordinary messages, resolve exactly their request."""
    caller, server, mine, inbox = _link()
    try:
        futs = [caller.request({"t": "ask", "n": i}) for i in range(n)]
        got = inbox.wait_for(n)
        by_n = {m["n"]: m["id"] for m in got}
        order = data.draw(st.permutations(range(n)), label="reply order")
        strays = data.draw(st.lists(st.integers(10_000, 20_000), max_size=5), label="unknown ids")
        dupes = data.draw(st.lists(st.sampled_from(range(n)), max_size=5), label="answered again")
        plan: List[Tuple[str, Any]] = [("reply", i) for i in order]
        for s in strays:
            plan.insert(data.draw(st.integers(0, len(plan))), ("stray", s))
        for d in dupes:  # after the first reply to the same request
            first = plan.index(("reply", d))
            plan.insert(data.draw(st.integers(first + 1, len(plan))), ("again", d))
        at = sorted(data.draw(st.lists(st.integers(0, len(plan)), max_size=5), label="ordinary messages at"))
        notes = len(at)
        for k in reversed(range(notes)):  # from the end, so earlier notes stay before later ones
            plan.insert(at[k], ("note", k))
        for what, x in plan:
            if what == "reply":
                server.reply(by_n[x], value={"n": x})
            elif what == "again":
                server.reply(by_n[x], value={"n": "duplicate"})
            elif what == "stray":
                server.reply(x, value={"n": "stray"})
            else:
                server.send({"t": "note", "k": x})
        assert [f.result(T) for f in futs] == [{"n": i} for i in range(n)]
        assert [m["k"] for m in mine.wait_for(notes)] == list(range(notes))
    finally:
        _close(caller)


# -- timeouts ----------------------------------------------------------------------------

def test_a_call_without_a_reply_times_out_naming_what_it_waited_for(link):
    caller, _, _, inbox = link
    with pytest.raises(TimeoutError, match=r"^fetching x: no reply from the peer within 0\.01 s$"):
        caller.call({"t": "slow"}, timeout=0.01, what="fetching x")
    assert inbox.wait_for(1)[0]["t"] == "req", "the request did go out"


def test_a_late_reply_does_not_answer_a_later_call(link):
    caller, server, _, inbox = link
    with pytest.raises(TimeoutError):
        caller.call({"t": "slow"}, timeout=0.01, what="slow")
    (late,) = inbox.wait_for(1)
    inbox.respond = lambda msg: server.reply(msg["id"], value="fresh")
    server.reply(late["id"], value="late")  # arrives before the next call's reply
    assert caller.call({"t": "next"}, timeout=T, what="next") == "fresh"


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    NotAllowed("torch.load is not on the owner's allowlist"),
    LimitExceeded("object limit reached (10 objects)"),
    ProtocolError("a message must be a map"),
    ConnectionLost("the link closed"),
    UnknownObject("object #4 does not exist"),
])
def test_our_own_errors_cross_the_wire_with_type_and_message(exc):
    back = error_from_wire(wire.decode(wire.encode(error_to_wire(exc))))
    assert type(back) is type(exc) and str(back) == str(exc)


def test_a_denial_keeps_its_reason_and_request_id():
    back = error_from_wire(error_to_wire(RequestDenied("too precise", 12)))
    assert isinstance(back, RequestDenied) and back.reason == "too precise" and back.request_id == 12
    assert error_from_wire({"type": "RequestDenied", "message": "x", "request": "12"}).request_id is None


def test_a_remote_error_passes_on_as_it_was():
    back = error_from_wire(error_to_wire(RemoteError("Tensor.sum", "TypeError", "details withheld")))
    assert isinstance(back, RemoteError) and (back.op, back.exc_type, back.detail) == ("Tensor.sum", "TypeError",
                                                                                       "details withheld")


def test_any_other_exception_is_reduced_to_its_type_name():
    wire_form = error_to_wire(KeyError("patient 1234: HIV positive"), op="Tensor.__getitem__")
    assert wire_form == {"type": "RemoteError", "op": "Tensor.__getitem__", "exc_type": "KeyError", "message": ""}
    back = error_from_wire(wire_form)
    assert isinstance(back, RemoteError) and "1234" not in str(back) and "KeyError" in str(back)


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1, max_size=60),
       cls=st.sampled_from([ValueError, KeyError, RuntimeError, TypeError, IndexError, ZeroDivisionError, OSError]))
def test_no_text_of_a_foreign_exception_reaches_the_wire(text, cls):
    encoded = wire.encode(error_to_wire(cls(text), op="op"))
    assert wire.decode(encoded) == {"type": "RemoteError", "op": "op", "exc_type": cls.__name__, "message": ""}


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), cls=st.sampled_from([NotAllowed, LimitExceeded, ProtocolError, ConnectionLost]))
def test_our_own_messages_round_trip_for_any_text(text, cls):
    back = error_from_wire(wire.decode(wire.encode(error_to_wire(cls(text)))))
    assert type(back) is cls and str(back) == text


@pytest.mark.parametrize("err, expected", [
    (None, ProtocolError), ("boom", ProtocolError), ({"message": "no type"}, ProtocolError), ({"type": 3}, ProtocolError),
    ({"type": "RequestTimeout", "message": "still pending"}, RequestTimeout),
    ({"type": "SomethingNew", "message": "m"}, RemoteError),
])
def test_errors_from_the_wire_are_always_our_types(err, expected):
    back = error_from_wire(err)
    assert type(back) is expected and isinstance(back, DuetError)
    if expected is RemoteError:
        assert back.exc_type == "SomethingNew" and back.detail == "m"


def test_errors_reach_the_caller_over_the_link(link):
    caller, server, _, inbox = link
    futs = [caller.request({"t": "ask", "n": i}) for i in range(6)]
    ids = [m["id"] for m in inbox.wait_for(6)]
    server.reply(ids[0], error=NotAllowed("Tensor.numpy is refused"))
    server.reply(ids[1], error=ValueError("private value 31.0"), op="Tensor.item")
    server.reply_error(ids[2], {"type": "LimitExceeded", "message": "queue full"})  # already in wire form
    server.send({"t": "rep", "id": ids[3], "ok": False, "error": "not a map"})
    server.send({"t": "rep", "id": ids[4], "value": 1})  # no ok: not a success
    server.reply(ids[5], error=RequestDenied("no", ids[5]))
    out = [_outcome(f) for f in futs]
    assert isinstance(out[0], NotAllowed) and str(out[0]) == "Tensor.numpy is refused"
    assert isinstance(out[1], RemoteError) and out[1].op == "Tensor.item" and "31.0" not in str(out[1])
    assert isinstance(out[2], LimitExceeded) and str(out[2]) == "queue full"
    assert isinstance(out[3], ProtocolError) and isinstance(out[4], ProtocolError)
    assert isinstance(out[5], RequestDenied) and out[5].request_id == ids[5]


# -- closing ----------------------------------------------------------------------------------

def test_the_peer_closing_fails_pending_calls_with_connection_lost(link):
    caller, server, _, inbox = link
    closed: List[Any] = []
    heard = threading.Event()  # callbacks run after the session counts as closed: wait for them
    caller.on_close(lambda reason: (closed.append(reason), heard.set()))
    futs = [caller.request({"t": "ask"}) for _ in range(3)]
    inbox.wait_for(3)
    _close(server)
    for fut in futs:
        with pytest.raises(ConnectionLost, match="the link to the peer is closed"):
            fut.result(T)
    assert caller.wait_closed(T) and caller.closed
    assert heard.wait(T) and closed == [None]
    with pytest.raises(ConnectionLost):
        caller.request({"t": "ask"})
    with pytest.raises(ConnectionLost):
        caller.send({"t": "act"})
    server.reply(inbox.messages[0]["id"], value=1)  # a reply on a closed link is dropped, not raised


def test_closing_our_own_end_fails_our_pending_calls():
    caller, server, _, inbox = _link()
    fut = caller.request({"t": "ask"})
    inbox.wait_for(1)
    _close(caller)
    with pytest.raises(ConnectionLost):
        fut.result(T)
    assert server.wait_closed(T), "the peer hears of it"


def test_close_callbacks_run_once_each_even_if_one_raises_and_late_ones_at_once(link, caplog):
    caller, server, _, _ = link
    heard: List[str] = []

    def broken(_reason: Any) -> None:
        heard.append("broken")
        raise RuntimeError("callback bug")

    caller.on_close(broken)
    caller.on_close(lambda reason: heard.append("second"))
    _close(server)
    assert caller.wait_closed(T)
    runtime.run(caller.close(), timeout=T)  # closing again: no second round
    caller.on_close(lambda reason: heard.append("late"))
    assert heard == ["broken", "second", "late"]
    assert "close callback failed" in caplog.text


class ScriptedTransport(Transport):
    """A transport driven by the test, synchronously: what the session sent, and a failure on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: List[bytes] = []
        self.fail_sends: Optional[BaseException] = None
        self._closed = False

    def send(self, data: bytes) -> None:
        if self.fail_sends is not None:
            raise self.fail_sends
        self.sent.append(data)

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def lose(self, reason: BaseException) -> None:
        """The link failed under the session (what a real transport reports to on_close)."""
        self._closed = True
        assert self._on_close is not None
        self._on_close(reason)


def test_a_link_failure_names_its_reason_to_pending_and_later_calls():
    transport = ScriptedTransport()
    session = Session(transport)
    fut = session.request({"t": "ask"})
    assert wire.decode(transport.sent[0])["id"] == fut.request_id
    transport.lose(ConnectionLost("no data from the peer for 15 s"))
    with pytest.raises(ConnectionLost, match="closed: no data from the peer for 15 s"):
        fut.result(0)
    assert isinstance(session.close_reason, ConnectionLost)
    with pytest.raises(ConnectionLost, match="no data from the peer"):
        session.request({"t": "ask"})


def test_a_request_that_cannot_be_sent_raises_and_leaves_nothing_pending():
    transport = ScriptedTransport()
    session = Session(transport)
    with pytest.raises(ProtocolError, match="cannot encode"):
        session.request({"t": "ask", "x": object()})
    transport.fail_sends = ConnectionLost("gone")
    with pytest.raises(ConnectionLost, match="gone"):
        session.request({"t": "ask"})
    assert session._pending == {}, "a failed send leaves no future behind to be failed later"


# -- what arrives -------------------------------------------------------------------------------

def _deep(depth: int) -> Any:
    out: Any = 0
    for _ in range(depth):
        out = [out]
    return out


@pytest.mark.parametrize("raw, why", [
    (b"\xc1", "never-used msgpack byte"),
    (b"", "empty"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"x": 1}), "no 't'"),
    (msgpack.packb({"t": 5}), "'t' not a string"),
    (msgpack.packb({"t": "act", "x": "y" * 5000}), "over max_message_bytes"),
    (msgpack.packb({"t": "act", "x": _deep(40)}), "deeper than max_depth"),
    (msgpack.packb({"t": "act", "x": msgpack.ExtType(99, b"")}), "unknown ext"),
    (msgpack.packb({"t": "act"}) + b"\x00", "trailing bytes"),
])
def test_malformed_and_oversize_messages_become_protocol_errors_and_the_link_survives(raw, why):
    limits = wire.Limits(max_message_bytes=4096, max_depth=32)
    caller, server, mine, inbox = _link(limits)
    try:
        inbox.respond = lambda msg: server.reply(msg["id"], value="still here") if msg["t"] == "req" else None
        server.transport.send(raw)
        (msg,) = mine.wait_for(1)
        assert msg["t"] == "$invalid" and isinstance(msg["error"], ProtocolError), why
        assert caller.last_message_bytes == len(raw)
        assert caller.call({"t": "ping"}, timeout=T, what="ping") == "still here"
    finally:
        _close(caller)


def test_an_oversize_reply_does_not_resolve_the_request():
    caller, server, mine, inbox = _link(wire.Limits(max_message_bytes=1024))
    fut = caller.request({"t": "ask"})
    (msg,) = inbox.wait_for(1)
    server.reply(msg["id"], value="x" * 2000)
    assert mine.wait_for(1)[0]["t"] == "$invalid"
    assert not fut.done()
    _close(caller)
    with pytest.raises(ConnectionLost):
        fut.result(T)


def test_a_handler_that_raises_does_not_stop_later_messages(link, caplog):
    caller, server, _, inbox = link

    def respond(msg: Dict[str, Any]) -> None:
        if msg.get("boom"):
            raise RuntimeError("handler bug")
        server.reply(msg["id"], value="ok")

    inbox.respond = respond
    caller.send({"t": "act", "boom": True})
    caller.request({"t": "ask", "boom": True})
    assert caller.call({"t": "ask"}, timeout=T, what="after a failing handler") == "ok"
    failures = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "handler bug"]
    assert len(failures) == 2, "each failure is logged, and only those"


def test_a_caller_whose_own_handler_raises_still_gets_replies(link):
    caller, server, _, inbox = link

    def broken(msg: Dict[str, Any]) -> None:
        raise RuntimeError("caller's handler bug")

    caller.set_handler(broken)
    inbox.respond = lambda msg: (server.send({"t": "note"}), server.reply(msg["id"], value="answer"))
    assert caller.call({"t": "ask"}, timeout=T, what="ask") == "answer"
