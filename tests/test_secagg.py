"""Secure aggregation, in process: the sum is exact for any dropouts the threshold allows, nothing is
revealed below it, one owner's masked vector looks uniform, and each step refuses what a hostile
relay could use to unmask an owner (forged adverts, two stories about who survived, asking twice)."""
from __future__ import annotations

import secrets
from typing import Dict, List, Sequence, Set, Tuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from duet.identity import Identity
from duet.secagg import masks, shamir
from duet.secagg.aggregate import RoundFailed, unmask_total
from duet.secagg.encoding import Segment, Spec, decode, encode
from duet.secagg.participant import Participant, Round, RoundRefused

SPEC = Spec((Segment("x", (6,), False), Segment("n", (), True)))


# -- shamir ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 9), st.data())
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(secret, n, data):
    t = data.draw(st.integers(n // 2 + 1, n))
    shares = shamir.split(secret, range(1, n + 1), t)
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert shamir.combine({i: shares[i] for i in subset}) == secret
    if t > 1:
        fewer = subset[: t - 1]
        try:
            assert shamir.combine({i: shares[i] for i in fewer}) != secret
        except ValueError:
            pass  # the interpolation left 32 bytes: plainly not the secret
    assert all(shamir.from_bytes(shamir.to_bytes(v)) == v for v in shares.values())


def test_one_share_is_uniform_whatever_the_secret():
    """t - 1 = 1 share of a 2-of-n sharing: its bits are a fair coin for a secret of zeros and of ones."""
    for secret in (bytes(32), b"\xff" * 32):
        bits = np.array([shamir.split(secret, [1, 2, 3], 2)[1] & 1 for _ in range(4000)])
        assert abs(bits.mean() - 0.5) < 6 * 0.5 / np.sqrt(4000)


# -- encoding ------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=6), st.integers(-10**9, 10**9), st.integers(2, 8))
def test_fixed_point_sums_are_exact_to_the_step(xs, k, owners):
    spec = Spec(SPEC.segments, 24, 2.0**30)
    spec.check(owners)
    total = sum((encode(spec, [np.array(xs), np.int64(k)]) for _ in range(owners)), np.zeros(spec.length, np.uint64))
    x, n = decode(spec, total)
    assert int(n) == owners * k
    assert np.all(np.abs(x - owners * np.array(xs)) <= owners * 2.0**-25 + 1e-9)


def test_the_spec_refuses_what_could_overflow_and_the_encoder_nan():
    with pytest.raises(ValueError, match="overflow"):
        Spec(SPEC.segments, 40, 2.0**30).check(3)
    with pytest.raises(ValueError, match="NaN"):
        encode(SPEC, [np.array([1.0, np.nan, 0, 0, 0, 0]), np.int64(1)])
    with pytest.raises(ValueError, match="shape"):
        encode(SPEC, [np.zeros(5), np.int64(1)])


# -- the protocol, in process ------------------------------------------------------------------------------
class Setup:
    def __init__(self, n: int, t: int, spec: Spec = SPEC, min_owners: int = 2) -> None:
        self.ids = [Identity.ephemeral() for _ in range(n)]
        self.round = Round(secrets.token_bytes(16), tuple(i.fingerprint for i in self.ids), t, spec)
        rng = np.random.default_rng(len(self.round.round_id))
        self.values = [(rng.uniform(-100, 100, 6), np.int64(rng.integers(0, 1000))) for _ in range(n)]
        vectors = [encode(spec, list(v)) if spec is SPEC else np.zeros(spec.length, dtype=np.uint64) for v in self.values]
        self.parts = [Participant(self.ids[k], self.round, k + 1, vectors[k], min_owners=min_owners) for k in range(n)]

    def p(self, v: int) -> Participant:
        return self.parts[v - 1]

    def run(self, gone_before_share: Set[int] = frozenset(), gone_before_mask: Set[int] = frozenset(),
            gone_before_unmask: Set[int] = frozenset()) -> Tuple[np.ndarray, List[int]]:
        n = len(self.parts)
        adverts = {v: self.p(v).advertise() for v in range(1, n + 1)}
        u1 = [v for v in adverts if v not in gone_before_share]
        sealed = {v: self.p(v).share_keys([adverts[w] for w in u1]) for v in u1}
        u2 = sorted(sealed)
        inbox: Dict[int, list] = {v: [] for v in u2}
        for frm in u2:
            for item in sealed[frm]:
                inbox[item["to"]].append({"from": frm, "ct": item["ct"]})
        masked = {v: self.p(v).masked_input(inbox[v]) for v in u2 if v not in gone_before_mask}
        u3 = sorted(masked)
        sigs = {v: self.p(v).consistency(u3) for v in u3}
        replies = {v: self.p(v).unmask(u3, sigs) for v in u3 if v not in gone_before_unmask}
        total = unmask_total(self.round, {v: a["mask"] for v, a in adverts.items()}, masked, replies, u2)
        return total, u3

    def expected(self, owners: Sequence[int]) -> Tuple[np.ndarray, int]:
        return sum(self.values[v - 1][0] for v in owners), sum(int(self.values[v - 1][1]) for v in owners)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.data())
def test_the_secure_sum_equals_the_plain_sum_of_the_owners_that_stayed(n, data):
    t = data.draw(st.integers(n // 2 + 1, n))
    owners = list(range(1, n + 1))
    spare = n - t
    early = set(data.draw(st.lists(st.sampled_from(owners), max_size=spare, unique=True)))
    late = set(data.draw(st.lists(st.sampled_from([v for v in owners if v not in early]), max_size=spare - len(early),
                                  unique=True)))
    setup = Setup(n, t)
    total, survivors = setup.run(gone_before_share=early, gone_before_mask=late)
    x, count = decode(SPEC, total)
    ex, ec = setup.expected(survivors)
    assert survivors == sorted(set(owners) - early - late)
    assert int(count) == ec and np.allclose(x, ex, atol=n * 2.0**-23)


def test_below_the_threshold_every_owner_refuses_and_nothing_is_unmasked():
    setup = Setup(5, 3)
    with pytest.raises(RoundRefused, match="at least 3"):
        setup.run(gone_before_mask={2, 4, 5})  # two masked vectors arrive: too few
    setup = Setup(5, 3)
    with pytest.raises(RoundFailed, match="shares"):
        setup.run(gone_before_unmask={1, 2, 3})  # the vectors arrived, but too few owners answer the unmasking


def test_one_masked_vector_is_uniform_whatever_the_value():
    """Chi-square of the top and bottom bytes of one owner's masked vector, for an all-zero and an
    all-max contribution: both uniform (p > 1e-6) and so alike."""
    spec = Spec((Segment("x", (100_000,), True),), 0, 2.0**30)
    for fill in (0, 2**30):
        setup = Setup(3, 2, spec)
        setup.parts[0].vector = encode(spec, [np.full(100_000, fill, dtype=np.int64)])
        adverts = [p.advertise() for p in setup.parts]
        sealed = {v: setup.p(v).share_keys(adverts) for v in (1, 2, 3)}
        inbox = [{"from": frm, "ct": item["ct"]} for frm in (2, 3) for item in sealed[frm] if item["to"] == 1]
        y = setup.p(1).masked_input(inbox)
        for shift in (56, 0):
            counts = np.bincount(((y >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6


def test_a_forged_advert_is_refused():
    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    mallory = masks.new_key()
    forged = dict(adverts[1], mask=bytes(mallory.public_key))  # the relay swaps in a key it knows
    with pytest.raises(RoundRefused, match="does not verify"):
        setup.p(1).share_keys([adverts[0], forged, adverts[2]])
    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    impostor = Identity.ephemeral()  # the relay signs an advert itself: a key that is not the participant's
    forged = dict(adverts[1], pub=impostor.public_key,
                  sig=impostor.sign(setup.round.transcript("advert", 2, adverts[1]["box"], adverts[1]["mask"])))
    with pytest.raises(RoundRefused, match="not theirs"):
        setup.p(1).share_keys([adverts[0], forged, adverts[2]])
    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    with pytest.raises(RoundRefused, match="degenerate"):
        setup.p(1).share_keys([adverts[0], dict(adverts[1], mask=bytes(32)), adverts[2]])


def test_two_stories_about_who_survived_are_refused():
    """The relay tells owners 1 and 2 that owner 3 survived and owners 4 and 5 that it dropped: to
    learn both its self mask and its mask key. Each story gathers fewer than the threshold's
    signatures (t = 3 of 5), so nobody unmasks."""
    setup = Setup(5, 3)
    adverts = [p.advertise() for p in setup.parts]
    sealed = {v: setup.p(v).share_keys(adverts) for v in range(1, 6)}
    inbox: Dict[int, list] = {v: [] for v in range(1, 6)}
    for frm in range(1, 6):
        for item in sealed[frm]:
            inbox[item["to"]].append({"from": frm, "ct": item["ct"]})
    for v in range(1, 6):
        setup.p(v).masked_input(inbox[v])
    story_a, story_b = [1, 2, 3, 4, 5], [1, 2, 4, 5]
    sigs_a = {v: setup.p(v).consistency(story_a) for v in (1, 2)}
    sigs_b = {v: setup.p(v).consistency(story_b) for v in (4, 5)}
    with pytest.raises(RoundRefused, match="signed this list"):
        setup.p(1).unmask(story_a, {**sigs_a, **sigs_b})
    with pytest.raises(RoundRefused, match="signed this list"):
        setup.p(4).unmask(story_b, {**sigs_a, **sigs_b})


def test_an_owner_unmasks_once_and_never_reveals_both_masks_of_one_owner():
    setup = Setup(4, 3)
    adverts = [p.advertise() for p in setup.parts]
    sealed = {v: setup.p(v).share_keys(adverts) for v in range(1, 5)}
    inbox: Dict[int, list] = {v: [] for v in range(1, 5)}
    for frm in range(1, 5):
        for item in sealed[frm]:
            inbox[item["to"]].append({"from": frm, "ct": item["ct"]})
    for v in range(1, 5):
        setup.p(v).masked_input(inbox[v])
    survivors = [1, 2, 3]
    sigs = {v: setup.p(v).consistency(survivors) for v in survivors}
    reply = setup.p(1).unmask(survivors, sigs)
    assert {v: kind for v, (kind, _s) in reply.items()} == {1: "seed", 2: "seed", 3: "seed", 4: "key"}
    with pytest.raises(RoundRefused, match="after"):
        setup.p(1).unmask([1, 2, 3, 4], sigs)  # a second story, after the first was answered


def test_tampered_shares_and_replays_are_refused():
    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    sealed = {v: setup.p(v).share_keys(adverts) for v in (1, 2, 3)}
    to_one = [{"from": frm, "ct": item["ct"]} for frm in (2, 3) for item in sealed[frm] if item["to"] == 1]
    bad = [dict(to_one[0], ct=bytes([to_one[0]["ct"][0] ^ 1]) + to_one[0]["ct"][1:]), to_one[1]]
    with pytest.raises(RoundRefused, match="do not open"):
        setup.p(1).masked_input(bad)
    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    sealed = {v: setup.p(v).share_keys(adverts) for v in (1, 2, 3)}
    to_two = [{"from": 1, "ct": item["ct"]} for item in sealed[1] if item["to"] == 2]
    with pytest.raises(RoundRefused, match="do not open|malformed"):
        setup.p(3).masked_input(to_two)  # owner 2's shares, replayed to owner 3


@pytest.mark.parametrize("n, t, match", [(3, 1, "more than half"), (4, 2, "more than half"), (1, 1, "2 to")])
def test_thresholds_must_be_a_majority(n, t, match):
    with pytest.raises(RoundRefused, match=match):
        Setup(n, t)


def test_a_round_smaller_than_the_owners_minimum_is_refused():
    with pytest.raises(RoundRefused, match="at least 4"):
        Setup(3, 2, min_owners=4)
    setup = Setup(4, 3, min_owners=4)  # then one owner drops: below this owner's minimum
    with pytest.raises(RoundRefused, match="at least 4"):
        setup.run(gone_before_mask={4})


def test_pairwise_masks_cancel_and_are_bound_to_the_round():
    a, b = masks.new_key(), masks.new_key()
    pa, pb = bytes(a.public_key), bytes(b.public_key)
    r1, r2 = secrets.token_bytes(16), secrets.token_bytes(16)
    assert masks.pair_seed(bytes(a), pa, pb, r1) == masks.pair_seed(bytes(b), pb, pa, r1)
    assert masks.pair_seed(bytes(a), pa, pb, r1) != masks.pair_seed(bytes(a), pa, pb, r2)
    total = masks.pairwise(1, bytes(a), pa, {2: pb}, r1, 1000) + masks.pairwise(2, bytes(b), pb, {1: pa}, r1, 1000)
    assert not total.any()
    with pytest.raises(ValueError, match="degenerate"):
        masks.pair_seed(bytes(a), pa, bytes(32), r1)  # a low-order key would make the agreement public
