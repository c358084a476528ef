"""Federations in process: secure sums as owners see them (approval, policy, audit), and federated
averaging whose securely summed model equals the plainly averaged one."""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
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
        owner.pin_federation(None, exact=True)  # these tests are about exact sums (opt-in)
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
    owner1.pin_federation([pairs[1][0].fingerprint], min_owners=2, exact=True)
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
    owner1.pin_federation(None, min_owners=3, exact=True)
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
            owner.pin_federation(None, min_owners=3, exact=True)
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


# -- attacks from a review of secure sums, each kept as a regression test ------------------------------------
def test_by_default_owners_refuse_exact_sums_whose_other_parts_the_scientist_chooses(tmp_path):
    """A review's attack: owners 2 and 3 contribute what the scientist chose (its own zeros, or their
    data times zero), so an exact "sum of three pinned owners" is owner 1's value. By default an
    owner takes part only in sums where it noises its own contribution (dp=)."""
    made: Pairs = []
    try:
        for k in range(3):
            owner, scientist = duet.local_pair(audit_log=tmp_path / f"audit-{k}.jsonl", owner_name=f"hospital {k + 1}")
            owner.store.add(torch.tensor([10.0 * (k + 1) + 0.5] * 4), name="ages")
            made.append((owner, scientist))
        prints = [o.fingerprint for o, _ in made]
        for owner, _ in made:
            owner.pin_federation([p for p in prints if p != owner.fingerprint], min_owners=3)
            owner.requests.add_handler(action="accept", secure_sum=True, min_owners=3, peers=prints)
        fed = duet.Federation([s for _, s in made], min_owners=3)
        s1, s2, s3 = fed
        for values in ([s1.store["ages"].sum(), s2.torch.tensor(0.0), s3.torch.tensor(0.0)],
                       [s1.store["ages"].sum(), s2.store["ages"].sum() * 0, s3.store["ages"].sum() * 0]):
            with pytest.raises(duet.SecureSumFailed, match="only with dp="):
                fed.secure_sum(values).get(timeout=30)
        assert all(not o.requests.history for o, _ in made)  # refused before anyone was asked
    finally:
        for owner, scientist in made:
            scientist.close()
            owner.close()


def test_every_owners_weight_is_signed_into_the_round_shown_and_audited(pairs):
    """A review's attack: weights [1, 1e-300, 1e-300] drown owners 2 and 3, each of which saw only
    its own weight. Now each owner is asked with every weight, signs them with the round, and an
    owner told other weights than the rest refuses the adverts."""
    for owner, _ in pairs:
        owner.requests.add_handler(action="accept", secure_sum=True)
    fed = duet.Federation([s for _, s in pairs])
    handle = fed.secure_sum(fed.map(lambda s: s.store["ages"].sum()), weights=[1.0, 1e-300, 1e-300])
    assert float(handle.get(timeout=30)) == pytest.approx(4.0)  # allowed here (exact=True), but not hidden:
    from duet.widgets.approval import request_html, request_text

    for owner, _ in pairs:
        req = owner.requests.history[-1]
        assert req.weights == (1.0, 1e-300, 1e-300)
        assert "weights: 1, 1e-300, 1e-300" in request_text(req) and "exact sum" in request_text(req)
        assert "1e-300" in request_html(req) and "Exact sum" in request_html(req)
        join = [e for e in owner.audit.read() if e["event"] == "secure_sum_join"][-1]
        assert join["weights"] == [1.0, 1e-300, 1e-300] and join["dp_epsilon"] is None
    # Telling owner 1 "all weights 1" and the others the drowning weights: their adverts disagree.
    from duet.secagg.encoding import Segment, Spec

    spec = Spec((Segment("value", (), False),), 24, 2.0**30)
    prints = [o.fingerprint for o, _ in pairs]
    rid = secrets.token_bytes(16)
    told = {1: [1, 1, 1], 2: [1, 1e-300, 1e-300], 3: [1, 1e-300, 1e-300]}
    adverts = [_call(s, rid, {"step": "join", "participants": prints, "index": k, "threshold": 2, "spec": spec.to_wire(),
                              "obj": s.store["ages"].sum().id, "weight": told[k][k - 1], "weights": told[k]})
               for k, (_o, s) in enumerate(pairs, start=1)]
    for k, (_o, s) in enumerate(pairs, start=1):
        with pytest.raises(duet.NotAllowed, match="signature|advert"):
            _call(s, rid, {"step": "share", "adverts": adverts})
    with pytest.raises(duet.NotAllowed, match="every owner's weight"):
        _call(pairs[0][1], secrets.token_bytes(16), {"step": "join", "participants": prints, "index": 1, "threshold": 2,
                                                     "spec": spec.to_wire(), "obj": pairs[0][1].store["ages"].sum().id,
                                                     "weight": 1})  # no weights: refused



def _call(s: duet.Scientist, rid: bytes, msg: dict, what: str = "secure sum") -> Any:
    return s.session.call({"kind": "secure_sum", "round": rid, **msg}, 30, what)


def _two_stories(tmp_path, threshold: int, max_colluders: Optional[int], stories: Dict[int, List[int]]) -> Dict[int, Any]:
    """Five pinned owners, owner 3 colluding with the scientist: it signs both survivor lists, and
    the scientist tells each honest owner its story. Per honest owner: its value as rebuilt from
    the shares the owners revealed, or the reason it refused to unmask."""
    from duet.identity import Identity
    from duet.secagg import masks, shamir
    from duet.secagg.encoding import Segment, Spec, decode
    from duet.secagg.participant import Participant, Round

    colluder = Identity.ephemeral()
    honest: Dict[int, Tuple[duet.Owner, duet.Scientist]] = {}
    try:
        for k in (1, 2, 4, 5):
            o, s = duet.local_pair(audit_log=tmp_path / f"a{k}.jsonl", owner_name=f"hospital {k}")
            o.store.add(torch.tensor([float(100 * k + 7)]), name="ages")
            honest[k] = (o, s)
        prints = [honest[k][0].fingerprint if k in honest else colluder.fingerprint for k in range(1, 6)]
        for o, _ in honest.values():
            o.pin_federation([p for p in prints if p != o.fingerprint], min_owners=3, max_colluders=max_colluders,
                             exact=True)
            o.requests.add_handler(action="accept", secure_sum=True, min_owners=3, peers=prints)
        spec = Spec((Segment("value", (), False),), 24, 2.0**30)
        rnd = Round(secrets.token_bytes(16), tuple(prints), threshold, spec, (1.0,) * 5)
        rid = rnd.round_id
        ads = {k: _call(s, rid, {"step": "join", "participants": prints, "index": k, "threshold": threshold,
                                 "spec": spec.to_wire(), "obj": s.store["ages"].sum().id, "weight": 1,
                                 "weights": [1] * 5})
               for k, (_o, s) in honest.items()}
        bad = Participant(colluder, rnd, 3, np.zeros(1, dtype=np.uint64), max_colluders=0)  # (its own choice)
        ads[3] = bad.advertise()
        adverts = [ads[k] for k in range(1, 6)]
        sealed = {k: _call(s, rid, {"step": "share", "adverts": adverts}) for k, (_o, s) in honest.items()}
        sealed[3] = bad.share_keys(adverts)
        inbox: Dict[int, list] = {k: [] for k in range(1, 6)}
        for frm, items in sealed.items():
            for it in items:
                inbox[it["to"]].append({"from": frm, "ct": it["ct"]})
        masked = {k: np.asarray(_call(s, rid, {"step": "masked", "sealed": inbox[k]})).view(np.uint64)
                  for k, (_o, s) in honest.items()}
        bad.masked_input(inbox[3])
        sigs = {k: _call(s, rid, {"step": "consistency", "survivors": stories[k]}) for k, (_o, s) in honest.items()}
        out: Dict[int, Any] = {}
        replies = {}
        for k, (_o, s) in honest.items():
            pairs = [[v, sigs[v]] for v in stories[k] if v in sigs and stories[v] == stories[k]]
            pairs.append([3, colluder.sign(bad.survivors_message(stories[k]))])  # the colluder signs every story
            try:
                replies[k] = {v: (kind, share) for v, kind, share in
                              _call(s, rid, {"step": "unmask", "survivors": stories[k], "signatures": pairs})}
            except duet.NotAllowed as exc:
                out[k] = str(exc)
        mask_pub = {k: ads[k]["mask"] for k in ads}
        for target in honest:
            if target in out:
                continue
            seed = {u: shamir.from_bytes(r[target][1]) for u, r in replies.items() if r[target][0] == "seed"}
            key = {u: shamir.from_bytes(r[target][1]) for u, r in replies.items() if r[target][0] == "key"}
            seed[3], key[3] = bad._received[target]
            if min(len(seed), len(key)) < threshold:
                out[target] = "not enough shares"
                continue
            b, sk = shamir.combine(dict(list(seed.items())[:threshold])), shamir.combine(dict(list(key.items())[:threshold]))
            y = masked[target] - masks.expand(b, 1) - masks.pairwise(target, sk, mask_pub[target], mask_pub, rid, 1)
            out[target] = float(decode(spec, y)[0])
        return out
    finally:
        for o, s in honest.values():
            s.close()
            o.close()


def test_one_colluding_owner_telling_two_stories_is_refused_at_join(tmp_path):
    """A review's attack: with t = 3 of 5 (a majority) and owner 3 colluding, the scientist told
    owners 1, 2 that [1, 2, 3] survived and owners 4, 5 that [3, 4, 5] did; each list had three
    valid signatures, and every honest value came out. Owners now refuse at join a threshold with
    2t <= n + c (c: fewer than a third of the owners by default), before any approval; the attack
    works only on owners that explicitly set max_colluders=0, and fails at the default threshold."""
    split = {1: [1, 2, 3], 2: [1, 2, 3], 4: [3, 4, 5], 5: [3, 4, 5]}
    with pytest.raises(duet.NotAllowed, match="does not withstand 1 owner"):
        _two_stories(tmp_path / "default", 3, None, split)
    assert _two_stories(tmp_path / "trusting", 3, 0, split) == {1: 107.0, 2: 207.0, 4: 407.0, 5: 507.0}
    four = {1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 4: [2, 3, 4, 5], 5: [2, 3, 4, 5]}  # (lists must hold t = 4 now)
    outcome = _two_stories(tmp_path / "four", 4, None, four)
    assert set(outcome) == {1, 2, 4, 5} and all("only 3 survivors signed" in str(v) for v in outcome.values())


def test_the_default_threshold_withstands_fewer_than_a_third_colluding(pairs):
    scientists = [s for _, s in pairs]
    assert duet.Federation(scientists).threshold == 2 and duet.Federation(scientists[:2]).threshold == 2
    with pytest.raises(ValueError, match="max_colluders"):
        pairs[0][0].pin_federation(None, max_colluders=-1)


def _join(s: duet.Scientist, prints: List[str], k: int, obj: int, weight: Any = 1, rid: Optional[bytes] = None,
          spec: Any = None) -> Any:
    from duet.secagg.encoding import Segment, Spec

    spec = spec or Spec((Segment("value", (), False),), 24, 2.0**30)
    return _call(s, rid or secrets.token_bytes(16), {"step": "join", "participants": prints, "index": k, "threshold": 2,
                                                     "spec": spec.to_wire(), "obj": obj, "weight": weight,
                                                     "weights": [weight if v == k else 1 for v in range(1, len(prints) + 1)]})


def test_the_join_answers_the_same_whatever_the_value(pairs):
    """A review's oracles: after approval, encoding raised "holds NaN or infinity", so joins with
    sqrt(total - c) (NaN iff total < c) or a weight making weight x value overflow answered a
    binary search for the value. Now any value joins alike (NaN as 0, infinity as clip), and
    the only weight refused is one whose product with clip is infinite, before any approval."""
    owner, s = pairs[0]
    prints = [o.fingerprint for o, _ in pairs]
    owner.store.add(torch.tensor([1e300]), name="huge")
    owner.requests.add_handler(action="accept", secure_sum=True)
    total = s.store["ages"].sum()  # 4.0
    for ptr, weight in [((total - 1.0).sqrt(), 1), ((total - 1000.0).sqrt(), 1),
                        (total, 1e299), (s.store["huge"].sum(), 1e299), (s.store["huge"].sum() * 1e300, 1)]:
        rid = secrets.token_bytes(16)
        advert = _join(s, prints, 1, ptr.id, weight, rid)
        assert sorted(advert) == ["box", "index", "mask", "pub", "sig"] and advert["index"] == 1
        _call(s, rid, {"step": "abort"})
    asked = len(owner.requests.history)
    with pytest.raises(duet.NotAllowed, match="product with clip"):
        _join(s, prints, 1, total.id, 1e300)
    assert len(owner.requests.history) == asked  # refused from public numbers, before any approval


def test_nan_counts_as_zero_and_infinity_as_the_clip_in_a_sum(pairs):
    for owner, _ in pairs:
        owner.requests.add_handler(action="accept", secure_sum=True)
    fed = duet.Federation([s for _, s in pairs])
    # totals 4, 8, 12: sqrt(total - 10) is NaN, NaN, sqrt(2)
    total = fed.secure_sum(fed.map(lambda s: (s.store["ages"].sum() - 10.0).sqrt())).get(timeout=30)
    assert float(total) == pytest.approx(2**0.5, abs=1e-6)
    total = fed.secure_sum(fed.map(lambda s: s.store["ages"].sum() * 1e308 * 10), clip=100.0).get(timeout=30)
    assert float(total) == 300.0  # three infinities, each counted as the clip


def test_open_rounds_count_against_the_scientists_memory_budget(tmp_path):
    """A review's memory attack: each open round held an 8-byte-per-number snapshot outside the
    budget (16 rounds of a 16 MiB object: +589 MiB). Now each open round counts 8 x length until
    it ends, is aborted or expires, and a join over the budget is refused."""
    from duet.identity import Identity
    from duet.owner.federation import ROUND_LIFETIME
    from duet.owner.objects import Limits
    from duet.secagg.encoding import Segment, Spec

    owner, s = duet.local_pair(audit_log=tmp_path / "audit.jsonl", limits=Limits(max_bytes=30 * 2**20))
    owner.pin_federation(None, exact=True)  # (the default policy refuses exact sums before any memory is held)
    try:
        n = 2**20
        big = s.torch.zeros(n)  # the scientist's own value (4 MiB): no approval needed
        spec = Spec((Segment("value", (n,), False),), 24, 2.0**30)
        prints = [owner.fingerprint, Identity.ephemeral().fingerprint]
        s.ping(timeout=30)
        conn = owner._connections[0]
        base = conn.objects.budget.bytes
        rids = [secrets.token_bytes(16) for _ in range(3)]
        for k, rid in enumerate(rids):
            _join(s, prints, 1, big.id, rid=rid, spec=spec)
            assert conn.objects.budget.bytes == base + (k + 1) * 8 * n
        with pytest.raises(duet.LimitExceeded, match="memory limit"):
            _join(s, prints, 1, big.id, spec=spec)  # 4 + 4 x 8 MiB > 30 MiB
        assert conn.objects.budget.bytes == base + 3 * 8 * n
        _call(s, rids[0], {"step": "abort"})
        assert conn.objects.budget.bytes == base + 2 * 8 * n
        with pytest.raises(duet.NotAllowed, match="malformed"):
            _call(s, rids[1], {"step": "share", "adverts": "not a list"})  # a refused step ends the round
        assert conn.objects.budget.bytes == base + 8 * n
        conn.secure_sums.expire(now=time.monotonic() + ROUND_LIFETIME + 1)
        assert conn.objects.budget.bytes == base and not conn.secure_sums.rounds
        with pytest.raises(duet.NotAllowed, match="fingerprints"):
            _join(s, [owner.fingerprint, "anything"], 1, big.id, spec=spec)
    finally:
        s.close()
        owner.close()


def test_a_finished_secure_sum_gives_its_memory_back(pairs):
    fed = duet.Federation([s for _, s in pairs])
    mine = fed.map(lambda s: s.torch.ones(1000))
    for s in fed:
        s.ping(timeout=30)
    before = [o._connections[0].objects.budget.bytes for o, _ in pairs]
    assert torch.equal(fed.secure_sum(mine).get(timeout=30), torch.full((1000,), 3.0))
    assert [o._connections[0].objects.budget.bytes for o, _ in pairs] == before


def test_a_round_id_runs_once(pairs):
    """A review's replay: round ids could be reused, so survivor-list signatures from an earlier
    run could count again. Signatures now bind the run's adverts (tests/test_secagg.py), and each
    owner remembers the round ids it took part in."""
    from duet.owner.federation import RoundIds

    _owner, s = pairs[0]
    prints = [o.fingerprint for o, _ in pairs]
    mine = s.torch.tensor(1.0)
    rid = secrets.token_bytes(16)
    _join(s, prints, 1, mine.id, rid=rid)
    _call(s, rid, {"step": "abort"})
    with pytest.raises(duet.NotAllowed, match="used before"):
        _join(s, prints, 1, mine.id, rid=rid)
    ids = RoundIds(keep=100.0, per_scientist=2)
    ids.claim("owner A", "sci", b"r1", now=0.0)
    ids.claim("owner B", "sci", b"r1", now=0.0)  # (another owner in the same process)
    ids.claim("owner A", "sci", b"r2", now=50.0)
    with pytest.raises(ValueError, match="used before"):
        ids.claim("owner A", "sci", b"r1", now=100.0)  # remembered for `keep` seconds
    with pytest.raises(ValueError, match="at most 2"):
        ids.claim("owner A", "sci", b"r3", now=100.0)  # a scientist using too many blocks only itself
    ids.claim("owner A", "another scientist", b"r3", now=100.0)
    ids.claim("owner A", "sci", b"r1", now=100.5)  # aged out after `keep` seconds: then forgotten
    assert len(ids) == 3  # (r2 of owner A, r3 of the other scientist, r1 again; owner B's r1 aged out too)
