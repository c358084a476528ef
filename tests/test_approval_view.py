"""What the owner sees when deciding cannot be made misleading by the scientist.

Each test is an attack a scientist would try on the approval view: hiding a
value-selecting operation behind a long chain, showing the owner made-up
operation names in strict mode, and control or bidi characters in the text
they write (their name, reasons, plan names).
"""
from __future__ import annotations

import unicodedata

import pytest
import torch

import duet
from duet import widgets
from duet.wire import Ref

ANSI = "\x1b[2J\x1b[1;1H"  # clear the screen, move the cursor home
BIDI = "\u202e"  # right-to-left override: "txt.exe" shows as "exe.txt"
ZERO_WIDTH = "\u200b\u2060\ufeff"


def _no_controls(text: str) -> None:
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"]
    assert not bad, f"control or format characters shown to the owner: {bad!r}"


def test_indexing_stays_visible_after_many_other_operations(pair):
    owner, scientist = pair
    v = scientist.store["ages"][2]
    for i in range(30):  # 30 distinct harmless-looking operations after the selection
        v = getattr(v, ["abs", "neg", "exp", "log", "sqrt", "float", "clone", "relu", "sigmoid", "tanh"][i % 10])()
        v = v + i
    v.request("just an aggregate, honest")
    req = owner.requests.wait_pending(10)
    assert "operator.getitem" in req.ops
    assert "operator.getitem" in repr(req) and "operator.getitem" in repr(owner.requests)
    html = widgets.request_html(req)
    assert "<b title='picks out individual values'>operator.getitem</b>" in html
    assert "operator.getitem" in widgets.request_text(req)


def test_strict_mode_shows_only_names_duet_checked(tmp_path):
    owner, scientist = duet.local_pair(approve="everything", audit_log=tmp_path / "a.jsonl")
    try:
        owner.store.add(torch.tensor([1.0, 2.0]), name="ages")
        ages = scientist.store["ages"]
        fake = "torch.mean  (a harmless mean)\u202e"
        scientist.session.send({"t": "call", "rid": 900, "kind": "func", "name": fake, "args": [Ref(ages.id)], "kwargs": {}})
        err = scientist.session.request({"kind": "meta", "obj": 900}).exception(timeout=10)
        assert isinstance(err, duet.NotAllowed)  # refused outright, never shown for approval
        assert owner.requests.pending == []
        ages.mean()  # a real one is shown, by the name Duet resolved
        req = owner.requests.wait_pending(10, kind="compute")
        assert "Tensor.mean" in req.ops
        for op in req.ops:
            _no_controls(op)
        req.deny("no")
    finally:
        scientist.close()
        owner.close()


def test_plan_with_an_unknown_action_name_is_refused_before_anyone_sees_it(pair):
    _, scientist = pair
    pid = scientist._new_rid()
    scientist.session.send({"t": "plan_def", "pid": pid, "inputs": 1, "outputs": [1], "name": "ok",
                            "actions": [{"rid": 1, "kind": "method", "name": "sum\u202e", "args": [Ref(0)], "kwargs": {}}]})
    scientist.ping(timeout=10)
    err = scientist.failures[pid]
    assert isinstance(err, duet.NotAllowed) and "allowlist" in str(err)


@pytest.mark.parametrize("payload", [ANSI + "approve me", "invoice" + BIDI + "fdp.exe", "a" + ZERO_WIDTH + "b"])
def test_scientist_text_is_shown_without_control_characters(tmp_path, payload):
    owner, scientist = duet.local_pair(scientist_name="Dr " + payload, audit_log=tmp_path / "a.jsonl")
    try:
        owner.store.add(torch.tensor([1.0, 2.0]), name="ages")
        scientist.store["ages"].sum().request(reason=payload + "\n" * 200 + "end")
        req = owner.requests.wait_pending(10)
        for text in (repr(req), repr(owner.requests), widgets.request_text(req), req.reason, req.requester.name,
                     repr(owner)):
            _no_controls(text)
        html = widgets.request_html(req)
        _no_controls(html)
        assert "max-height:8em;overflow:auto" in widgets.approval.STYLE  # a long reason scrolls inside its box
        assert "\ufffd" in req.reason or payload.isprintable()  # replaced visibly, not silently dropped
    finally:
        scientist.close()
        owner.close()


def test_plan_names_are_cleaned(pair):
    owner, scientist = pair
    pid = scientist._new_rid()
    scientist.session.send({"t": "plan_def", "pid": pid, "inputs": 1, "outputs": [0], "name": ANSI + "step" + BIDI,
                            "actions": []})
    scientist.ping(timeout=10)
    conn = owner.scientists[0]
    plan = conn.training.plans.get(pid)
    _no_controls(plan.name)
    assert "step" in plan.name


def test_a_selecting_operation_late_in_a_chain_is_shown(pair):
    """Found by the second review: the table cut the operations column at 60 characters, so the
    `getitem` at the end of a long enough chain never reached the owner's screen."""
    owner, scientist = pair
    scientist.store["ages"].abs().sqrt().exp().log().relu()[2].request("a transformed mean")
    req = owner.requests.wait_pending(10)
    assert "operator.getitem" in repr(owner.requests)
    assert "operator.getitem" in owner.requests._repr_html_()
    req.deny("no")


def test_each_operation_is_counted_as_often_as_it_ran(pair):
    owner, scientist = pair
    total = scientist.torch.zeros(4)
    total.copy_(scientist.store["ages"])
    for _ in range(3):
        total.add_(scientist.store["ages"])
    total.request("three times")
    req = owner.requests.wait_pending(10)
    assert req.ops == ("torch.zeros", "ages", "Tensor.copy_", "Tensor.add_ ×3")
    req.deny("no")


def _packed(scientist: duet.Scientist, make: str) -> duet.Pointer:
    """Ages carried by a value a size rule might count as one element (or none)."""
    ages = [scientist.store["ages"][i].long().item() for i in range(2)]
    if make == "string":  # its length is the first age
        return scientist._call("func", "operator.mul", ["x", ages[0]], {})
    if make == "empty shape":  # zero elements, shape (31, 45, 0)
        return scientist.torch.zeros(ages[0], ages[1], 0)
    if make == "empty lists":  # zero elements, 31 empty lists
        return scientist._call("func", "operator.mul", [[[]], ages[0]], {})
    d = scientist.send({})  # one key and its value: two ages
    d[ages[0]] = ages[1]
    return d


@pytest.mark.parametrize("make", ["string", "dict keys", "empty shape", "empty lists"])
def test_a_size_rule_counts_what_a_value_can_carry(pair, make):
    """A rule that accepts one element must not release an age spelled out as a string's length,
    two ages as a dict's key and value, nor ages as the shape or length of an empty value (found by
    the fourth review). (Integers are at most 64 bits on the wire.)"""
    owner, scientist = pair
    owner.requests.add_handler(action="accept", datasets=["ages"], max_elements=1)
    assert scientist.store["ages"][0].get(timeout=10, reason="one") == 31.0  # the rule does accept one
    _packed(scientist, make).request("one element, says the rule")
    req = owner.requests.wait_pending(10)
    assert req.kind == "release", req
    req.deny("no")
