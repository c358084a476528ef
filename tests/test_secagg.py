"""Secure aggregation, in process: the sum is exact for any dropouts the threshold allows, nothing is
revealed below it, one owner's masked vector looks uniform, and each step refuses what a hostile
relay could use to unmask an owner (forged adverts, two stories about who survived, with or
without owners colluding, signatures from another run, asking twice, malformed shares); any value
encodes, so encoding can answer nothing about one."""
from __future__ import annotations

import secrets
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from duet.identity import Identity
from duet.secagg import masks, shamir
from duet.secagg.aggregate import RoundFailed, unmask_total
from duet.secagg.encoding import Segment, Spec, check_weight, decode, encode
from duet.secagg.participant import (MAX_MASK_WORDS, Participant, Round, RoundRefused, default_colluders,
                                     smallest_threshold, withstands)

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


def test_the_spec_refuses_what_could_overflow_and_the_encoder_wrong_shapes():
    with pytest.raises(ValueError, match="overflow"):
        Spec(SPEC.segments, 40, 2.0**30).check(3)
    with pytest.raises(ValueError, match="shape"):
        encode(SPEC, [np.zeros(5), np.int64(1)])
    with pytest.raises(ValueError, match="not integers"):
        encode(SPEC, [np.zeros(6), np.float64(1)])


_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ANY_FLOAT, min_size=6, max_size=6),
       st.one_of(st.just(1.0), st.floats(1e-300, 2.0**993), st.sampled_from([2.0**993, 1.6e299])))
def test_any_float_encodes_nan_as_zero_and_infinities_as_the_clip(xs, weight):
    """The oracle of a review: encoding raised on NaN or infinity (a value's own, or weight x value
    overflowing), after approval, so `sqrt(total - c)` or a huge weight answered total < c. Now
    every value encodes, as NaN -> 0 and +-inf -> +-clip after weighting, and never warns."""
    spec = Spec((Segment("x", (6,), False),), 24, 2.0**30)
    check_weight(spec, weight)  # (every weight drawn here has a finite product with clip)
    with np.errstate(all="raise"):
        got = encode(spec, [np.array(xs)], weight)
    with np.errstate(all="ignore"):
        weighted = np.array(xs, dtype=np.float64) * weight
    want = np.where(np.isnan(weighted), 0.0, np.clip(np.nan_to_num(weighted, posinf=spec.clip, neginf=-spec.clip),
                                                     -spec.clip, spec.clip))
    (x,) = decode(spec, got)
    assert np.all(np.abs(x - want) <= 2.0**-25)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-2**63, 2**63 - 1).map(np.int64), st.integers(0, 2**64 - 1).map(np.uint64),
                 st.integers(-128, 127).map(np.int8), st.booleans().map(np.bool_)),
       st.integers(1, 2**53), st.sampled_from([1.0, 1000.0, 2.0**40]))
def test_integers_are_weighted_and_clipped_exactly_without_wrapping(value, weight, clip):
    spec = Spec((Segment("n", (), True),), 0, clip)
    check_weight(spec, weight)
    (total,) = decode(spec, encode(spec, [value], weight))
    assert int(total) == max(-int(clip), min(int(clip), int(value) * weight))


def test_weights_are_refused_from_public_numbers_only():
    spec = Spec(SPEC.segments, 24, 2.0**30)
    for bad in (0, -1.0, float("nan"), float("inf"), 1e300, 10**400, True, "2"):
        with pytest.raises(ValueError, match="weight"):
            check_weight(spec, bad)
    with pytest.raises(ValueError, match="whole number"):
        check_weight(spec, 2.5)  # SPEC has an integer part
    assert check_weight(Spec(SPEC.segments[:1]), 1e299) == 1e299  # (floats only; 1e299 x 2^30 is still finite)


# -- the protocol, in process ------------------------------------------------------------------------------
class Setup:
    def __init__(self, n: int, t: int, spec: Spec = SPEC, min_owners: int = 2, max_colluders: Optional[int] = None) -> None:
        self.ids = [Identity.ephemeral() for _ in range(n)]
        self.round = Round(secrets.token_bytes(16), tuple(i.fingerprint for i in self.ids), t, spec)
        rng = np.random.default_rng(len(self.round.round_id))
        self.values = [(rng.uniform(-100, 100, 6), np.int64(rng.integers(0, 1000))) for _ in range(n)]
        vectors = [encode(spec, list(v)) if spec is SPEC else np.zeros(spec.length, dtype=np.uint64) for v in self.values]
        self.parts = [Participant(self.ids[k], self.round, k + 1, vectors[k], min_owners=min_owners,
                                  max_colluders=max_colluders) for k in range(n)]

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
    t = data.draw(st.integers(smallest_threshold(n), n))
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
    setup = Setup(5, 4)
    with pytest.raises(RoundRefused, match="at least 4"):
        setup.run(gone_before_mask={4, 5})  # three masked vectors arrive: too few
    setup = Setup(5, 4)
    with pytest.raises(RoundFailed, match="shares"):
        setup.run(gone_before_unmask={1, 2})  # the vectors arrived, but too few owners answer the unmasking


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
    signatures (t = 3 of 5, owners that trust that none colludes), so nobody unmasks."""
    setup = Setup(5, 3, max_colluders=0)
    masked_round(setup)
    story_a, story_b = [1, 2, 3, 4, 5], [1, 2, 4, 5]
    sigs_a = {v: setup.p(v).consistency(story_a) for v in (1, 2)}
    sigs_b = {v: setup.p(v).consistency(story_b) for v in (4, 5)}
    with pytest.raises(RoundRefused, match="signed this list"):
        setup.p(1).unmask(story_a, {**sigs_a, **sigs_b})
    with pytest.raises(RoundRefused, match="signed this list"):
        setup.p(4).unmask(story_b, {**sigs_a, **sigs_b})


def masked_round(setup: Setup, skip: Sequence[int] = ()) -> Dict[int, np.ndarray]:
    """Every owner but `skip` (which the caller plays) advertises, shares keys and masks; the
    masked vectors by owner."""
    n = len(setup.parts)
    adverts = [p.advertise() for p in setup.parts]
    sealed = {v: setup.p(v).share_keys(adverts) for v in range(1, n + 1)}
    inbox: Dict[int, list] = {v: [] for v in range(1, n + 1)}
    for frm in range(1, n + 1):
        for item in sealed[frm]:
            inbox[item["to"]].append({"from": frm, "ct": item["ct"]})
    return {v: setup.p(v).masked_input(inbox[v]) for v in range(1, n + 1) if v not in skip}


def two_stories_with_colluders(n: int, t: int, colluders: int, max_colluders: Optional[int]) -> List[List[int]]:
    """The attack of a review: owners 1..c collude with the scientist and sign both stories; the
    honest owners are split in two halves, each told that everyone but one owner y of the other
    half survived (so one half reveals y's self-mask share and the other y's mask-key share, and
    with the colluders' own shares both masks of every honest owner are rebuilt). The halves
    whose owners all unmasked: both, and every honest value is out."""
    setup = Setup(n, t, max_colluders=max_colluders)
    masked_round(setup)
    bad = list(range(1, colluders + 1))
    honest = list(range(colluders + 1, n + 1))
    halves = [honest[: len(honest) // 2], honest[len(honest) // 2:]]
    stories = [sorted(set(range(1, n + 1)) - {halves[1][0]}), sorted(set(range(1, n + 1)) - {halves[0][0]})]
    unmasked = []
    for half, story in zip(halves, stories):
        sigs = {v: setup.p(v).consistency(story) for v in half}
        colluding = {u: setup.parts[u - 1].identity.sign(setup.p(half[0]).survivors_message(story)) for u in bad}
        done = []
        for v in half:
            try:
                setup.p(v).unmask(story, {**sigs, **colluding})
                done.append(v)
            except RoundRefused as exc:
                assert "signed this list" in str(exc)
        if done == half:
            unmasked.append(half)
    return unmasked


def test_one_colluding_owner_cannot_tell_two_stories_against_the_default_bound():
    """A review's attack (n = 5, t = 3, one colluder): each story had 3 valid signatures, so all
    four honest owners unmasked and every honest value was recovered. Every owner now refuses a
    round unless 2t > n + c (c: fewer than a third of the owners, by default); the attack works
    only against owners that explicitly assume no colluder, and at most one story gathers enough
    signatures at the thresholds they require."""
    with pytest.raises(RoundRefused, match="does not withstand 1 owner"):
        Setup(5, 3)
    assert two_stories_with_colluders(5, 3, 1, max_colluders=0) == [[2, 3], [4, 5]]  # what max_colluders=0 accepts
    assert two_stories_with_colluders(5, 4, 1, max_colluders=None) == []
    assert len(two_stories_with_colluders(7, 5, 2, max_colluders=None)) <= 1
    assert len(two_stories_with_colluders(9, 6, 2, max_colluders=None)) <= 1


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 64), st.data())
def test_the_collusion_bound_holds_exactly_when_no_two_stories_can_be_signed(n, data):
    """For every n, t and c: two lists each with t signatures, c of them colluders signing both and
    the honest ones signing one, exist exactly when 2t <= n + c; the default threshold is the
    least that withstands fewer than a third."""
    t = data.draw(st.integers(1, n))
    c = data.draw(st.integers(0, n))
    honest = n - c
    splittable = any(h1 + c >= t and (honest - h1) + c >= t for h1 in range(honest + 1))
    assert withstands(n, t, c) == (not splittable)
    default = smallest_threshold(n)
    assert withstands(n, default, default_colluders(n)) and not withstands(n, default - 1, default_colluders(n))
    assert default_colluders(n) * 3 < n <= default_colluders(n) * 3 + 3 and default <= n


def test_the_default_thresholds():
    assert {n: smallest_threshold(n) for n in (2, 3, 4, 5, 7, 10)} == {2: 2, 3: 2, 4: 3, 5: 4, 7: 5, 10: 7}


def test_a_signature_from_another_run_of_the_same_round_id_does_not_count():
    """A review's replay: the signatures bound only the round's id, participants, threshold and
    spec, so owner 2's signature on [1, 2] from an earlier run with the same round id let owner 1
    unmask in a later one. They now sign a hash of every advert (fresh keys per run) too."""
    ids = [Identity.ephemeral() for _ in range(3)]
    rnd = Round(secrets.token_bytes(16), tuple(i.fingerprint for i in ids), 2, Spec((Segment("v", (1,), True),), 0, 1.0))

    def run() -> List[Participant]:
        setup = Setup(3, 2)
        setup.ids, setup.round = ids, rnd
        setup.parts = [Participant(ids[k], rnd, k + 1, np.zeros(1, np.uint64)) for k in range(3)]
        masked_round(setup)
        return setup.parts

    old = run()
    old_signature_of_2 = old[1].consistency([1, 2])
    new = run()
    own = new[0].consistency([1, 2])
    with pytest.raises(RoundRefused, match="only 1 survivors signed"):
        new[0].unmask([1, 2], {1: own, 2: old_signature_of_2})
    fresh = run()  # (and a signature from the same run counts)
    assert sorted(fresh[0].unmask([1, 2], {1: fresh[0].consistency([1, 2]), 2: fresh[1].consistency([1, 2])})) == [1, 2, 3]


def test_a_malformed_share_in_a_well_sealed_box_refuses_the_round():
    """A review's finding: an owner sealing a share that is not 66 bytes made the honest owner
    raise a plain ValueError and stay at "masked". Now the round is refused, and over."""
    import msgpack
    import nacl.public

    setup = Setup(3, 2)
    adverts = [p.advertise() for p in setup.parts]
    for p in setup.parts:
        p.share_keys(adverts)
    bad = nacl.public.Box(setup.p(2)._box, nacl.public.PublicKey(adverts[0]["box"])).encrypt(
        msgpack.packb([setup.round.round_id, 2, 1, b"x", b"y"], use_bin_type=True))
    with pytest.raises(RoundRefused, match="from owner 2 are malformed"):
        setup.p(1).masked_input([{"from": 2, "ct": bytes(bad)}])
    assert setup.p(1).stage == "refused"
    with pytest.raises(RoundRefused, match="round is at 'refused'"):
        setup.p(1).consistency([1, 2, 3])


def test_participants_are_fingerprints_and_masking_is_bounded():
    ids = [Identity.ephemeral() for _ in range(2)]
    with pytest.raises(RoundRefused, match="fingerprints"):
        Round(secrets.token_bytes(16), (ids[0].fingerprint, "anything"), 2, SPEC).check()
    with pytest.raises(RoundRefused, match="fingerprints"):
        Round(secrets.token_bytes(16), (ids[0].fingerprint, ids[1].fingerprint.upper()), 2, SPEC).check()
    big = Spec((Segment("x", (MAX_MASK_WORDS // 4,), True),), 0, 1.0)
    prints = tuple(Identity.ephemeral().fingerprint for _ in range(5))
    Round(secrets.token_bytes(16), prints[:4], 3, big).check()  # 4 x 2^26 words: the most one round may mask
    with pytest.raises(RoundRefused, match="more masking"):
        Round(secrets.token_bytes(16), prints, 4, big).check()


def test_an_owner_unmasks_once_and_never_reveals_both_masks_of_one_owner():
    setup = Setup(4, 3)
    masked_round(setup)
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


@pytest.mark.parametrize("n, t, match", [(3, 1, "more than half"), (4, 2, "more than half"), (1, 1, "2 to"),
                                         (4, 3, None), (5, 3, "withstand"), (7, 4, "withstand")])
def test_thresholds_must_be_a_majority_and_withstand_the_default_colluders(n, t, match):
    if match is None:
        Setup(n, t)
        return
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
