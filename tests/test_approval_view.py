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
        assert "max-height:8em;overflow:auto" in widgets._STYLE  # a long reason scrolls inside its box
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
