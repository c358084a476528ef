"""A dropped link can be resumed: objects, pending requests and decisions survive."""
from __future__ import annotations

import time

import pytest
import torch

import duet
from duet import runtime

pytestmark = pytest.mark.slow


@pytest.fixture
def owner(tmp_path):
    owner = duet.launch(name="o", local_only=True, display=False, audit_log=tmp_path / "a.jsonl", resume_window=30)
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages")
    yield owner
    owner.close()


def _drop(scientist: duet.Scientist) -> None:
    """Lose the link without saying goodbye, as a sleeping laptop would."""
    runtime.run(scientist.session.transport.close(), timeout=10)
    assert scientist.session.wait_closed(10)


def _wait_for(predicate, timeout: float, owner: duet.Owner) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        owner.requests.wait_changed(0.2)


def test_resume_keeps_objects_and_pending_requests(owner):
    scientist = duet.join(owner.code, name="Dr. Lee", local_only=True)
    mine = scientist.send(torch.tensor([1.0, 2.0]))
    total = scientist.store["ages"].sum()
    handle = total.request("sum")
    owner.requests.wait_pending(10)
    _drop(scientist)
    with pytest.raises(duet.ConnectionLost):
        handle.wait(10)  # the pending get fails clearly on the drop
    _wait_for(lambda: owner.suspended, 15, owner)
    assert owner.scientists == [] and len(owner.requests.pending) == 1
    with pytest.raises(duet.ConnectionLost):
        mine.get(timeout=5)

    scientist.resume(timeout=20)
    assert scientist.resumed and scientist.connected
    assert torch.equal(mine.get(timeout=10), torch.tensor([1.0, 2.0]))
    assert len(owner.requests.pending) == 1, "the earlier request is reused, not duplicated"
    owner.requests.pending[0].accept()
    assert total.get(timeout=10).item() == 157.0
    scientist.close()


def test_decision_made_while_away_is_delivered_after_resume(owner):
    scientist = duet.join(owner.code, name="Dr. Lee", local_only=True)
    total = scientist.store["ages"].max()
    total.request("max")
    req = owner.requests.wait_pending(10)
    _drop(scientist)
    _wait_for(lambda: owner.suspended, 15, owner)
    req.deny("not while you are away")
    scientist.resume(timeout=20)
    with pytest.raises(duet.RequestDenied, match="not while you are away"):
        total.get(timeout=10)
    scientist.close()


def test_leaving_is_final_and_resume_window_expires(tmp_path):
    owner = duet.launch(name="o", local_only=True, display=False, audit_log=tmp_path / "a.jsonl", resume_window=0.5)
    try:
        scientist = duet.join(owner.code, name="Dr. Lee", local_only=True)
        scientist.send(torch.ones(1))
        _drop(scientist)
        _wait_for(lambda: not owner.suspended and not owner.scientists, 20, owner)
        with pytest.raises(duet.RequestDenied, match="nothing to resume"):
            scientist.resume(timeout=20)
        other = duet.join(owner.code, name="other", local_only=True)
        other.close()  # an explicit leave: nothing is kept
        _wait_for(lambda: not owner.scientists and not owner.suspended, 20, owner)
    finally:
        owner.close()


def test_resume_needs_the_same_identity(owner, monkeypatch, tmp_path):
    scientist = duet.join(owner.code, name="Dr. Lee", local_only=True)
    _drop(scientist)
    _wait_for(lambda: owner.suspended, 15, owner)
    scientist.identity = duet.identity.Identity.ephemeral()  # someone else holding the token
    with pytest.raises(duet.RequestDenied, match="nothing to resume"):
        scientist.resume(timeout=20)
    assert len(owner.suspended) == 1
