"""Secret sharing (duet.sharing): the ring, and the parties of a sum and a dot product run
in process with the scientist's relaying done by hand, so every message can be inspected or
tampered with. Across real owner processes: tests/test_smpc.py."""
from __future__ import annotations

import secrets
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from duet.identity import Identity
from duet.sharing import ring
from duet.sharing.party import Dealer, Description, Job, JobRefused, Party, describe_message, verify_adverts


def _described(ids: Sequence[Identity], job_id: bytes, op: str) -> tuple:
    out = []
    for i, ident in enumerate(ids, start=1):
        sig = ident.sign(describe_message(job_id, op, i, ["data"], ["mean", "sub"]))
        out.append(Description(i, ident.public_key, ("data",), ("mean", "sub"), sig))
    return tuple(out)


def make_job(ids: Sequence[Identity], op: str, length: int, bounds: Sequence[float], reduce: bool = True,
             dealer: Optional[Identity] = None, frac_bits: int = ring.FRAC_BITS) -> Job:
    job_id = secrets.token_bytes(16)
    return Job(job_id, op, tuple(i.fingerprint for i in ids), dealer.fingerprint if dealer else "", length, frac_bits,
               tuple(float(b) for b in bounds), reduce, _described(ids, job_id, op))


class Relay:
    """The scientist's part: carry every message to its addressee, and keep what it saw."""

    def __init__(self) -> None:
        self.seen: List[Any] = []

    def route(self, sealed: Sequence[Dict[str, Any]]) -> Dict[int, List[Dict[str, Any]]]:
        out: Dict[int, List[Dict[str, Any]]] = {}
        for item in sealed:
            self.seen.append(item["ct"])
            out.setdefault(item["to"], []).append(item)
        return out


def run_dot(x: np.ndarray, y: np.ndarray, bounds=(10.0, 10.0), reduce: bool = True, frac_bits: int = ring.FRAC_BITS,
            relay: Optional[Relay] = None) -> tuple:
    ids, dealer_id = [Identity.ephemeral(), Identity.ephemeral()], Identity.ephemeral()
    job = make_job(ids, "dot", len(x), bounds, reduce, dealer_id, frac_bits)
    parties = [Party(ids[0], job, 1, ring.encode(x, frac_bits, bounds[0])),
               Party(ids[1], job, 2, ring.encode(y, frac_bits, bounds[1]))]
    dealer = Dealer(dealer_id, job)
    relay = relay or Relay()
    adverts = [dealer.advertise()] + [p.advertise() for p in parties]
    inbox = relay.route(dealer.deal(adverts) + parties[0].deal(adverts) + parties[1].deal(adverts))
    openings = relay.route(parties[0].open(inbox[1]) + parties[1].open(inbox[2]))
    shares = [parties[0].finish(openings[1]), parties[1].finish(openings[2])]
    return ring.decode(ring.combine(shares), job.scale_bits), shares, job


def run_sum(vectors: Sequence[np.ndarray], bound: float = 100.0, reduce: bool = True) -> tuple:
    ids = [Identity.ephemeral() for _ in vectors]
    job = make_job(ids, "sum", len(vectors[0]), [bound] * len(vectors), reduce)
    parties = [Party(ident, job, i, ring.encode(v, job.frac_bits, bound)) for i, (ident, v) in enumerate(zip(ids, vectors), 1)]
    adverts = [p.advertise() for p in parties]
    relay = Relay()
    sealed: List[Dict[str, Any]] = []
    for p in parties:
        sealed += p.deal(adverts)
    inbox = relay.route(sealed)
    shares = [p.open(inbox[p.index]) for p in parties]
    return ring.decode(ring.combine(shares), job.scale_bits), shares


finite = st.floats(-10, 10, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=50))
def test_a_shared_dot_product_equals_the_plain_one_within_the_fixed_point_step(pairs):
    x = np.array([a for a, _ in pairs])
    y = np.array([b for _, b in pairs])
    got, _shares, _job = run_dot(x, y)
    assert abs(got[0] - float(x @ y)) <= ring.product_error(len(x), 10.0, 10.0, ring.FRAC_BITS)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(1, 30), st.data())
def test_a_shared_sum_equals_the_plain_one_within_the_fixed_point_step(owners, length, data):
    vectors = [np.array(data.draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=length, max_size=length)))
               for _ in range(owners)]
    total, _ = run_sum(vectors)
    assert abs(total[0] - float(sum(v.sum() for v in vectors))) <= ring.sum_error(owners * length, ring.FRAC_BITS)
    elementwise, _ = run_sum(vectors, reduce=False)
    assert np.abs(elementwise - sum(vectors)).max() <= ring.sum_error(owners, ring.FRAC_BITS)


def test_elementwise_products_and_the_wrap_around_the_ring_are_exact():
    x, y = np.array([-3.5, 2.25, 0.0, -1.0]), np.array([2.0, -4.0, 7.5, -1.0])
    got, _, _ = run_dot(x, y, reduce=False)
    assert np.array_equal(got, x * y)  # representable inputs: no rounding at all


def _chi_square_p(words: np.ndarray) -> float:
    """p-value of the bytes of `words` being uniform (256 bins)."""
    counts = np.bincount(np.frombuffer(words.tobytes(), dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_no_owners_share_or_result_share_alone_is_distinguishable_from_uniform():
    """Zeros in, so anything not uniform would show: the share each owner receives of the other's
    vector, each opening e and f, and each result share the scientist sees pass a chi-square test
    of their bytes; and shares of the same value differ from run to run."""
    n = 4096
    ids, dealer_id = [Identity.ephemeral(), Identity.ephemeral()], Identity.ephemeral()
    job = make_job(ids, "dot", n, (1.0, 1.0), False, dealer_id)
    a, b = Party(ids[0], job, 1, ring.encode(np.zeros(n), 16, 1.0)), Party(ids[1], job, 2, ring.encode(np.zeros(n), 16, 1.0))
    dealer = Dealer(dealer_id, job)
    adverts = [dealer.advertise(), a.advertise(), b.advertise()]
    relay = Relay()
    inbox = relay.route(dealer.deal(adverts) + a.deal(adverts) + b.deal(adverts))
    openings = relay.route(a.open(inbox[1]) + b.open(inbox[2]))
    received = [a._held[2], b._held[1]]  # each owner's share of the other's zeros
    opened = [*a._opened, *b._opened]  # e and f as each owner sends them to the other
    shares = [a.finish(openings[1]), b.finish(openings[2])]
    assert not ring.combine(shares).any()  # the products of zeros are zero ...
    p_values = [_chi_square_p(w) for w in received + opened + shares]
    assert min(p_values) > 1e-6, p_values  # ... yet each part alone looks uniform (chance failure: 1e-5)
    _, first = run_sum([np.zeros(8), np.zeros(8)], reduce=False)
    _, second = run_sum([np.zeros(8), np.zeros(8)], reduce=False)
    assert not np.array_equal(first[0], second[0])


def test_the_scientist_cannot_forge_tamper_with_or_replay_messages():
    ids, dealer_id = [Identity.ephemeral(), Identity.ephemeral()], Identity.ephemeral()
    job = make_job(ids, "dot", 3, (1.0, 1.0), True, dealer_id)
    a, b = Party(ids[0], job, 1, ring.encode(np.ones(3), 16, 1.0)), Party(ids[1], job, 2, ring.encode(np.ones(3), 16, 1.0))
    dealer = Dealer(dealer_id, job)
    adverts = [dealer.advertise(), a.advertise(), b.advertise()]
    # the scientist plays the dealer with a key of its own: refused
    impostor = Identity.ephemeral()
    forged = dict(adverts[0], pub=impostor.public_key, sig=impostor.sign(job.transcript("advert", 0, adverts[0]["box"])))
    with pytest.raises(JobRefused, match="not theirs"):
        verify_adverts(job, [forged] + adverts[1:])
    # adverts replayed into another job: refused
    other = make_job(ids, "dot", 3, (1.0, 1.0), True, dealer_id)
    with pytest.raises(JobRefused, match="does not verify"):
        verify_adverts(other, adverts)
    relay = Relay()
    inbox = relay.route(dealer.deal(adverts) + a.deal(adverts) + b.deal(adverts))
    # a flipped bit in a sealed share: refused, and nothing goes on after a refused step
    item = inbox[2][0]
    flipped = dict(item, ct=item["ct"][:-1] + bytes([item["ct"][-1] ^ 1]))
    with pytest.raises(JobRefused, match="does not open"):
        b.open([flipped] + inbox[2][1:])
    assert b.stage == "refused"
    with pytest.raises(JobRefused, match="comes after"):
        b.finish([])
    # a box sealed to b, handed to a: it does not open there
    with pytest.raises(JobRefused):
        a.open([dict(inbox[2][0], to=1)] + [i for i in inbox[1] if i["from"] == 0])


def test_terms_that_could_overflow_or_that_are_malformed_are_refused_before_any_value():
    ids, dealer_id = [Identity.ephemeral(), Identity.ephemeral()], Identity.ephemeral()
    with pytest.raises(JobRefused, match="overflow"):
        make_job(ids, "dot", 1 << 20, (1e3, 1e3), True, dealer_id).check()
    make_job(ids, "dot", 1 << 20, (1e3, 1e3), True, dealer_id, frac_bits=8).check()  # a coarser step fits
    with pytest.raises(JobRefused, match="dealer"):
        make_job(ids, "dot", 3, (1.0, 1.0), True, None).check()
    with pytest.raises(JobRefused, match="dealer who is none"):
        make_job(ids, "dot", 3, (1.0, 1.0), True, ids[0]).check()
    with pytest.raises(JobRefused, match="two owners"):
        make_job(ids + [Identity.ephemeral()], "dot", 3, (1.0, 1.0, 1.0), True, dealer_id).check()
    job = make_job(ids, "sum", 3, (1.0, 1.0))
    with pytest.raises(JobRefused, match="not the party"):
        Party(ids[1], job, 1, np.zeros(3, np.uint64))
    with pytest.raises(JobRefused, match="length"):
        Party(ids[0], job, 1, np.zeros(4, np.uint64))
    tampered = job.to_wire()
    tampered["descriptions"][1]["lineage"] = ["something else"]
    with pytest.raises(JobRefused, match="does not verify"):
        Job.from_wire(tampered)
    assert Job.from_wire(job.to_wire()) == job


def test_encoding_never_fails_whatever_the_values():
    got = ring.decode(ring.encode(np.array([np.nan, np.inf, -np.inf, 1e300, -2.5]), 16, 4.0), 16)
    assert got.tolist() == [0.0, 4.0, -4.0, 4.0, -2.5]
