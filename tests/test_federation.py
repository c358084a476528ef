"""Federations in process: secure sums as owners see them (approval, policy, audit), and federated
averaging whose securely summed model equals the plainly averaged one."""
from __future__ import annotations

import threading
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import duet
from duet.datasets import MNIST


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, 2)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(F.relu(self.conv(x)).flatten(1)), dim=1)


Pairs = List[Tuple[duet.Owner, duet.Scientist]]


@pytest.fixture
def pairs(tmp_path):
    made: Pairs = []
    for k in range(3):
        owner, scientist = duet.local_pair(audit_log=tmp_path / f"audit-{k}.jsonl", owner_name=f"hospital {k + 1}",
                                           scientist_name="Dr. Lee")
        owner.store.add(torch.tensor([float(k + 1)] * 4), name="ages")
        made.append((owner, scientist))
    yield made
    for owner, scientist in made:
        scientist.close()
        owner.close()


def test_each_owner_approves_its_contribution_and_sees_who_else_takes_part(pairs):
    fed = duet.Federation([s for _, s in pairs])
    result: list = []
    t = threading.Thread(target=lambda: result.append(fed.secure_sum(fed.map(lambda s: s.store["ages"].sum()))
                                                      .get(reason="cohort total", timeout=30)))
    t.start()
    prints = [o.fingerprint for o, _ in pairs]
    for owner, _ in pairs:
        req = owner.requests.wait_pending(timeout=10, kind="secure_sum")
        assert list(req.participants) == prints and req.threshold == 2 and req.lineage == ("ages",)
        assert "summed with 3 owners" in repr(req) or "secure_sum" in repr(req)
        from duet.widgets.approval import request_html, request_text

        assert owner.fingerprint in request_html(req) and "only the sum" in request_html(req)
        assert "summed with 3 owners" in request_text(req)
        req.accept()
    t.join(30)
    assert float(result[0]) == 4 * (1 + 2 + 3)
    for owner, _ in pairs:
        events = [e["event"] for e in owner.audit.read()]
        assert "secure_sum_join" in events and "secure_sum_unmask" in events


def test_a_denial_by_one_owner_leaves_too_few_and_the_sum_fails(pairs):
    fed = duet.Federation([s for _, s in pairs], min_owners=3)
    for owner, _ in pairs[:2]:
        owner.requests.add_handler(action="accept", secure_sum=True)
    pairs[2][0].requests.add_handler(action="deny", secure_sum=True, reason="not this week")
    with pytest.raises(duet.SecureSumFailed, match="not this week"):
        fed.secure_sum(fed.map(lambda s: s.store["ages"].sum())).get(timeout=30)


def test_rules_match_only_federations_big_enough_and_among_known_peers(pairs):
    for owner, _ in pairs:
        owner.requests.add_handler(action="accept", secure_sum=True, min_owners=3,
                                   peers=[o.fingerprint for o, _ in pairs])
    fed = duet.Federation([s for _, s in pairs])
    assert float(fed.secure_sum(fed.map(lambda s: s.store["ages"].sum())).get(timeout=30)) == 24.0
    two = duet.Federation([s for _, s in pairs[:2]])
    result: list = []
    t = threading.Thread(target=lambda: result.append(
        two.secure_sum(two.map(lambda s: s.store["ages"].sum())).get(timeout=30)))
    t.start()
    req = pairs[0][0].requests.wait_pending(timeout=10, kind="secure_sum")  # the rule did not match: a person decides
    assert len(req.participants) == 2
    for owner, _ in pairs[:2]:
        owner.requests.wait_pending(timeout=10, kind="secure_sum").accept()
    t.join(30)
    assert float(result[0]) == 12.0


def test_a_pinned_owner_refuses_strangers_and_small_federations(pairs):
    owner1 = pairs[0][0]
    owner1.pin_federation([pairs[1][0].fingerprint], min_owners=2)
    for owner, _ in pairs:
        owner.requests.add_handler(action="accept", secure_sum=True)
    fed = duet.Federation([s for _, s in pairs])
    handle = fed.secure_sum(fed.map(lambda s: s.store["ages"].sum()))
    with pytest.warns(UserWarning, match="hospital 1 dropped out"):
        assert float(handle.get(timeout=30)) == 4 * (2 + 3)  # the others went on without owner 1's value
    assert handle.report.owners == ["hospital 2", "hospital 3"]
    with pytest.raises(duet.SecureSumFailed, match="not one this owner aggregates with"):
        strict = duet.Federation([s for _, s in pairs], min_owners=3)
        strict.secure_sum(strict.map(lambda s: s.store["ages"].sum())).get(timeout=30)
    owner1.pin_federation(None, min_owners=3)
    with pytest.raises(duet.SecureSumFailed, match="requires at least 3"):
        two = duet.Federation([s for _, s in pairs[:2]])
        two.secure_sum(two.map(lambda s: s.store["ages"].sum())).get(timeout=30)
    with pytest.raises(ValueError, match="fingerprints"):
        owner1.pin_federation(["not a fingerprint"])


def test_the_scientists_own_values_need_no_approval_and_shapes_must_agree(pairs):
    fed = duet.Federation([s for _, s in pairs])
    mine = fed.map(lambda s: s.torch.ones(3) * 2)
    assert torch.equal(fed.secure_sum(mine).get(timeout=30), torch.full((3,), 6.0))
    assert all(not o.requests.pending and not o.requests.history for o, _ in pairs)
    with pytest.raises(ValueError, match="owner 2"):
        fed.secure_sum([pairs[0][1].torch.ones(3), pairs[1][1].torch.ones(4), pairs[2][1].torch.ones(3)])
    with pytest.raises(duet.NotAllowed, match="shape depends on private"):
        fed.secure_sum(fed.map(lambda s: s.store["ages"][s.store["ages"] > 1]))


def test_federated_averaging_through_secure_sums_equals_plain_averaging(tmp_path):
    full, test = MNIST(train=True, limit=3000), MNIST(train=False, limit=1000)
    made: Pairs = []
    try:
        for k in range(3):
            owner, scientist = duet.local_pair(audit_log=tmp_path / f"audit-{k}.jsonl", owner_name=f"hospital {k + 1}")
            owner.store.add(torch.utils.data.TensorDataset(full.data[k::3], full.targets[k::3]), name="mnist-train")
            owner.requests.add_handler(action="accept", secure_sum=True, min_owners=3)
            owner.requests.add_handler(action="accept", kind="release")  # (plain averaging releases each model)
            made.append((owner, scientist))
        fed = duet.Federation([s for _, s in made], min_owners=3)

        def accuracy(m: nn.Module) -> float:
            with torch.no_grad():
                return float((m(test.data).argmax(1) == test.targets).float().mean())

        torch.manual_seed(0)
        net = SmallNet()
        secure = fed.train(net, "mnist-train", rounds=2, lr=0.05, test=accuracy, progress=False)
        plain = fed.train(net, "mnist-train", rounds=2, lr=0.05, secure=False, test=accuracy, progress=False)
        diff = max(float((secure.state_dict()[k] - plain.state_dict()[k]).abs().max()) for k in secure.state_dict())
        assert diff < 1e-5  # the fixed point's rounding only
        history = fed.history
        assert [h["secure"] for h in history] == [True, True, False, False]
        assert history[1]["test"] > 0.7 and history[1]["test"] > history[0]["test"] - 0.05
        assert history[0]["owners"] == ["hospital 1", "hospital 2", "hospital 3"] and history[0]["bytes_per_owner"] > 8 * 11530
        assert torch.equal(next(iter(net.parameters())), next(iter(net.parameters())))  # (the given model is untouched)
    finally:
        for owner, scientist in made:
            scientist.close()
            owner.close()


def test_owners_can_add_their_own_noise_to_a_secure_sum(tmp_path):
    """dp=epsilon: each owner releases its aggregate with its own noise (charged to the scientist's
    budget with it) before masking; the sum carries everyone's noise and reveals no one's row."""
    made: Pairs = []
    try:
        for k in range(3):
            owner, scientist = duet.local_pair(audit_log=tmp_path / f"audit-{k}.jsonl", owner_name=f"hospital {k + 1}")
            owner.store.add(torch.full((200,), 50.0), name="ages", bounds=(0, 100))
            owner.store.add(torch.full((200,), 50.0), name="undeclared")
            owner.privacy.budget(epsilon=2.0)
            owner.requests.add_handler(action="accept", secure_sum=True, dp=True)
            made.append((owner, scientist))
        fed = duet.Federation([s for _, s in made])
        total = fed.secure_sum(fed.map(lambda s: s.store["ages"].mean()), dp=1.0).get(timeout=30)
        # each owner's noise std: sqrt(2) * (100 / 200) / 1 = 0.71; three of them: 1.2; 10 of those is never seen
        assert abs(float(total) - 150.0) < 12
        for owner, scientist in made:
            assert owner.privacy.summary(scientist.identity.fingerprint)["spent_epsilon"] == pytest.approx(1.0)
            assert any(r.dp_epsilon == 1.0 for r in owner.requests.history)
        with pytest.raises(duet.SecureSumFailed, match="declared bounds"):
            fed.secure_sum(fed.map(lambda s: s.store["undeclared"].mean()), dp=1.0).get(timeout=30)
        with pytest.raises(duet.SecureSumFailed, match="over your budget"):
            fed.secure_sum(fed.map(lambda s: s.store["ages"].mean()), dp=1.5).get(timeout=30)
    finally:
        for owner, scientist in made:
            scientist.close()
            owner.close()
