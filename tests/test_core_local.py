"""End to end on local_pair(): the issue's example, denial, timeout, rules, freeing, limits."""
from __future__ import annotations

import gc
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import duet
from duet import wire
from tests.clock import FakeClock
from tests.waiting import until


def test_the_example(pair):
    owner, scientist = pair
    listing = scientist.store.listing()
    assert listing == [
        {"name": "ages", "description": "patient ages", "tags": [], "type": "Tensor", "shape": [4], "dtype": "float32"}
    ]
    assert "patient ages" in repr(scientist.store) and "31" not in repr(scientist.store)
    ages = scientist.store["ages"]
    assert isinstance(ages, duet.Pointer)
    m = (ages * 2 + 1).mean()
    assert isinstance(m, duet.Pointer)
    h = m.request(reason="mean age for the paper")
    assert h.status == "pending"
    req = owner.requests.wait_pending(10)
    assert req.kind == "release" and req.lineage == ("ages",)
    assert req.requester.name == "Dr. Lee" and req.requester.fingerprint == scientist.identity.fingerprint
    assert req.reason == "mean age for the paper"
    assert list(req.ops) == ["ages", "operator.mul", "operator.add", "Tensor.mean"]
    assert torch.equal(req.preview(), torch.tensor(79.5))
    owner.requests.pending[0].accept()
    value = m.get(reason="...", timeout=30)
    assert torch.equal(value, torch.tensor(79.5))
    assert h.status == "accepted"


def test_own_data_needs_no_approval(pair):
    owner, scientist = pair
    mine = scientist.torch.tensor([1.0, 2.0]) * 3
    assert torch.equal(mine.get(timeout=10), torch.tensor([3.0, 6.0]))
    assert np.array_equal(scientist.numpy.arange(5).get(timeout=10), np.arange(5))
    sent = scientist.send(np.array([1.5, 2.5]))
    assert np.array_equal((sent * 2).get(timeout=10), np.array([3.0, 5.0]))
    assert owner.requests.pending == [] and owner.requests.history == []


def test_torch_function_and_functional_run_remotely(pair):
    _, scientist = pair
    x = scientist.send(torch.tensor([-1.0, 2.0]))
    assert torch.equal(torch.add(x, 1).get(timeout=10), torch.tensor([0.0, 3.0]))
    assert torch.equal(F.relu(x).get(timeout=10), torch.tensor([0.0, 2.0]))
    assert torch.equal(x.abs().sum().get(timeout=10), torch.tensor(3.0))
    assert torch.equal(x[1].get(timeout=10), torch.tensor(2.0))
    with pytest.raises(duet.NotAllowed, match="allowlist"):
        torch.fft.fft(x)  # a torch function that is not on the list
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(x, "/tmp/duet-never-written")  # type: ignore[arg-type]


def test_denial_carries_reason(pair):
    owner, scientist = pair
    m = scientist.store["ages"].max()
    h = m.request("max age")
    owner.requests.wait_pending(10).deny(reason="too identifying")
    with pytest.raises(duet.RequestDenied, match="too identifying") as info:
        h.wait(10)
    assert info.value.reason == "too identifying"
    assert h.status == "denied"


def test_timeout_leaves_request_pending_and_waitable(pair):
    owner, scientist = pair
    m = scientist.store["ages"].sum()
    with pytest.raises(duet.RequestTimeout) as info:
        m.get(reason="sum", timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert len(owner.requests.pending) == 1
    owner.requests.pending[0].accept()
    assert torch.equal(m.get(timeout=10), torch.tensor(157.0))  # same handle, no second request
    assert len(owner.requests.history) == 1


def test_auto_approval_rule(pair):
    owner, scientist = pair
    rule = owner.requests.add_handler(action="accept", datasets=["ages"], max_elements=10)
    ages = scientist.store["ages"]
    assert torch.equal(ages.sum().get(timeout=10), torch.tensor(157.0))
    # too big for the rule: waits for the owner
    owner.store.add(torch.zeros(100), name="big")
    big = scientist.store["big"] + 0
    with pytest.raises(duet.RequestTimeout):
        big.get(timeout=0.2)
    assert owner.requests.pending[0].numel == 100
    owner.requests.remove_handler(rule)
    with pytest.raises(duet.RequestTimeout):
        (ages * 1).get(timeout=0.2)


def test_rule_on_other_dataset_does_not_match(pair):
    owner, scientist = pair
    owner.store.add(torch.ones(3), name="other")
    owner.requests.add_handler(action="accept", datasets=["other"])
    mixed = scientist.store["ages"].sum() + scientist.store["other"].sum()
    with pytest.raises(duet.RequestTimeout):
        mixed.get(timeout=0.2)
    assert set(owner.requests.pending[0].lineage) == {"ages", "other"}


def test_deny_rule_by_fingerprint(pair):
    owner, scientist = pair
    owner.requests.add_handler(action="deny", kind="release", scientist=scientist.identity.fingerprint, reason="not you")
    with pytest.raises(duet.RequestDenied, match="not you"):
        scientist.store["ages"].sum().get(timeout=10)


def test_audit_log_records_decisions_and_releases(pair):
    owner, scientist = pair
    m = scientist.store["ages"].mean()
    h = m.request("mean")
    owner.requests.wait_pending(10).accept()
    value = h.wait(10)
    records = owner.audit.read()
    events = [r["event"] for r in records]
    assert "request" in events and "decision" in events and "release" in events
    release = next(r for r in records if r["event"] == "release")
    assert release["sha256"] == hashlib.sha256(wire.encode(value)).hexdigest()
    assert release["assets"] == ["ages"] and release["fingerprint"] == scientist.identity.fingerprint


def test_expired_request_is_denied(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    clock = FakeClock()
    owner.requests.clock = clock  # before any request, so created and expires come from it
    owner.store.add(torch.ones(2), name="x")
    try:
        handle = scientist.store["x"].sum().request("total")
        req = owner.requests.wait_pending(10)
        expiry = owner.requests.default_expiry
        assert req.expires == clock() + expiry
        clock.advance(expiry - 1)
        assert owner.requests.expire_due() == 0 and req.pending
        clock.advance(1)
        # Nothing here expires it: the owner's own periodic tick must.
        with pytest.raises(duet.RequestDenied, match="expired"):
            handle.wait(10)
        assert owner.requests.history == [req] and req.status == "expired" and req.decided_by == "expiry"
        assert req.decided_at == clock()
    finally:
        scientist.close()
        owner.close()


def test_strict_mode_waits_for_compute_approval(tmp_path):
    owner, scientist = duet.local_pair(approve="everything", audit_log=tmp_path / "a.jsonl")
    owner.store.add(torch.ones(2), name="x")
    try:
        y = scientist.send(torch.tensor([1.0, 2.0])) * 2
        req = owner.requests.wait_pending(10, kind="compute")
        assert req.type_name == "operator.mul"
        req.accept()
        assert torch.equal(y.get(timeout=10), torch.tensor([2.0, 4.0]))
        z = y + 1
        owner.requests.wait_pending(10, kind="compute").deny("no")
        with pytest.raises(duet.RequestDenied):
            z.get(timeout=10)
    finally:
        scientist.close()
        owner.close()


def test_freed_objects_leave_the_owner(pair):
    owner, scientist = pair
    conn = owner.scientists[0]
    xs = [scientist.send(torch.ones(1000)) for _ in range(10)]
    scientist.ping()
    assert len(conn.objects) == 10
    del xs
    gc.collect()
    scientist.ping()
    assert len(conn.objects) == 0 and conn.objects.total_bytes == 0


def test_object_limit_fails_one_action_and_session_goes_on(tmp_path):
    owner, scientist = duet.local_pair(limits=duet.Limits(max_objects=3), audit_log=tmp_path / "a.jsonl")
    try:
        kept = [scientist.send(torch.ones(1)) for _ in range(3)]
        extra = scientist.send(torch.ones(1))
        with pytest.raises(duet.LimitExceeded, match="object limit"):
            extra.get(timeout=10)
        del extra
        kept.pop()
        gc.collect()
        assert torch.equal((kept[0] + 1).get(timeout=10), torch.tensor([2.0]))
    finally:
        scientist.close()
        owner.close()


def test_byte_limit_and_factory_guard(tmp_path):
    owner, scientist = duet.local_pair(limits=duet.Limits(max_bytes=10_000), audit_log=tmp_path / "a.jsonl")
    try:
        with pytest.raises(duet.LimitExceeded):
            scientist.torch.zeros(1_000_000).get(timeout=10)
        with pytest.raises(duet.LimitExceeded):
            scientist.torch.zeros(10**12).get(timeout=10)
        assert torch.equal(scientist.torch.zeros(2).get(timeout=10), torch.zeros(2))
    finally:
        scientist.close()
        owner.close()


def test_queued_action_limit(tmp_path):
    owner, scientist = duet.local_pair(
        approve="everything", limits=duet.Limits(max_queued_actions=5), audit_log=tmp_path / "a.jsonl"
    )
    try:
        x = scientist.send(torch.ones(1))
        blocker = x + 1  # waits for compute approval, holding the queue
        owner.requests.wait_pending(10, kind="compute")
        later = [x + i for i in range(10)]
        # The refusal happens as the owner queues the actions: let them all arrive before approving.
        until(lambda: later[-1]._rid in scientist.failures, timeout=10)
        owner.requests.add_handler(action="accept", kind="compute")
        assert torch.equal(blocker.get(timeout=10), torch.tensor([2.0]))
        assert torch.equal(later[0].get(timeout=10), torch.tensor([1.0]))
        with pytest.raises(duet.LimitExceeded, match="queued"):
            later[-1].get(timeout=10)
    finally:
        scientist.close()
        owner.close()


def test_remote_error_names_op_and_type_only(pair):
    _, scientist = pair
    a = scientist.send(torch.ones(2, 3))
    bad = a @ a  # shape mismatch on the owner
    with pytest.raises(duet.RemoteError) as info:
        bad.get(timeout=10)
    assert info.value.op == "operator.matmul" and info.value.exc_type == "RuntimeError"
    # later actions on the failed object report the root cause
    with pytest.raises(duet.RemoteError, match="operator.matmul"):
        (bad + 1).get(timeout=10)


def test_pointer_never_reveals_values(pair):
    _, scientist = pair
    ages = scientist.store["ages"]
    for attempt in (bool, len, float, int, complex, lambda p: [0, 1][p], lambda p: f"{p:.2f}"):
        with pytest.raises(TypeError, match="reveal"):
            attempt(ages)
    rows = list(ages)  # as many as the public shape says: pointers, not values
    assert len(rows) == 4 and all(isinstance(r, duet.Pointer) and r.private for r in rows)
    assert "31" not in repr(ages) and "31" not in f"{ages}"


def test_shape_is_public_but_masked_shape_is_private(pair):
    _, scientist = pair
    ages = scientist.store["ages"]
    assert ages.shape == torch.Size([4])
    assert ages.dtype == torch.float32
    assert (ages * 2).shape == torch.Size([4])
    with pytest.raises(duet.NotAllowed, match="depends on private values"):
        ages[ages > 40].shape
    with pytest.raises(duet.NotAllowed, match="depends on private values"):
        torch.masked_select(ages, ages > 40).shape


def test_nn_and_optim_namespaces(pair):
    _, scientist = pair
    torch.manual_seed(0)
    lin = scientist.torch.nn.Linear(2, 1)
    opt = scientist.torch.optim.SGD(lin.parameters(), lr=0.1)
    x = scientist.send(torch.tensor([[1.0, 2.0]]))
    loss = (lin(x) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    w = lin.weight.get(timeout=10)
    assert w.shape == (1, 2)
    grad = lin.weight.grad.get(timeout=10)
    assert grad.shape == (1, 2) and torch.count_nonzero(grad) > 0


def test_repr_of_owner_and_queue(pair):
    owner, scientist = pair
    (scientist.store["ages"].sum()).request("<b>bold</b> reason")
    owner.requests.wait_pending(10)
    text = repr(owner.requests)
    assert "their words" in text and "Dr. Lee" in text
    html = owner.requests._repr_html_()
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "ages" in owner._repr_html_()


def test_owner_close_tells_scientist(pair):
    owner, scientist = pair
    h = scientist.store["ages"].sum().request("x")
    owner.requests.wait_pending(10)
    owner.close(reason="the clinic is closing")
    with pytest.raises((duet.ConnectionLost, duet.RequestDenied)):
        h.wait(10)
    assert scientist.session.wait_closed(10)
    with pytest.raises(duet.ConnectionLost, match="clinic is closing"):
        scientist.send(torch.ones(1))


def test_asking_again_after_a_rule_accepted_gets_the_value_again(pair):
    """A rule that decides inside submit must not leave a spent request behind: the second get is not None."""
    owner, scientist = pair
    owner.requests.add_handler(action="accept", datasets=["ages"])
    total = scientist.store["ages"].sum()
    assert total.get(timeout=10).item() == 157.0
    second = total.get(timeout=10)
    assert second is not None and second.item() == 157.0
