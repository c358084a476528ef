"""Secure sums across owners in real processes over real WebRTC: exact sums with three and five
owners, an owner killed mid-round recovered, nothing revealed below the threshold, a forged key
advert refused, a Sybil federation refused, and one owner's masked vector uniform."""
from __future__ import annotations

import contextlib
import secrets
import warnings
from typing import Iterator, List, Tuple

import numpy as np
import pytest
import torch
from scipy import stats

import duet
from duet.secagg.encoding import Segment, Spec
from tests.procs.helpers import Proc, start_owner, start_signaling

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def signaling():
    proc, url = start_signaling()
    yield url
    proc.stop()


@contextlib.contextmanager
def federation(url: str, tmp_path, values: List[float], extra: Tuple[str, ...] = (),
               per_owner: Tuple[Tuple[str, ...], ...] = ()) -> Iterator[Tuple[List[Proc], List[duet.Scientist], List[str]]]:
    """Owner processes (each with its own identity and a 'values' asset) and a scientist joined to each."""
    procs: List[Proc] = []
    scientists: List[duet.Scientist] = []
    try:
        infos = []
        for k, v in enumerate(values):
            args = ("--signaling", url, "--name", f"owner {k + 1}", "--federated", str(v), *extra,
                    *(per_owner[k] if k < len(per_owner) else ()))
            proc, info = start_owner(*args, env={"DUET_CONFIG_DIR": str(tmp_path / f"owner-{k + 1}")})
            procs.append(proc)
            infos.append(info)
        scientists = [duet.join(info["code"], name="Dr. Lee", local_only=True) for info in infos]
        yield procs, scientists, [info["fingerprint"] for info in infos]
    finally:
        for s in scientists:
            s.close()
        for proc in procs:
            proc.stop()


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
def test_the_secure_sum_equals_the_plain_sum(signaling, tmp_path, values):
    with federation(signaling, tmp_path, values) as (_procs, scientists, _prints):
        fed = duet.Federation(scientists, min_owners=len(values))
        total = fed.secure_sum(fed.map(lambda s: s.store["values"])).get(reason="test", timeout=60)
        assert torch.allclose(total, torch.full((8,), float(sum(values))), atol=len(values) * 2.0**-24)
        count = fed.secure_sum(fed.map(lambda s: s.store["count"])).get(timeout=60)
        assert int(count) == int(sum(values))  # integers: exact
        mean = fed.secure_mean(fed.map(lambda s: s.store["values"].sum()), fed.map(lambda s: (s.store["values"] > 0).sum()))
        assert float(mean) == pytest.approx(sum(values) / len(values))


def test_an_owner_killed_mid_round_is_recovered_from_the_others_shares(signaling, tmp_path):
    with federation(signaling, tmp_path, [1.0, 2.0, 3.0]) as (procs, scientists, _prints):
        def kill_third(step: str, alive: List[int]) -> None:
            if step == "sharing keys":  # it shared its keys, then vanished before masking its value
                procs[2].kill()

        fed = duet.Federation(scientists, threshold=2, step_timeout=20, on_step=kill_third)
        handle = fed.secure_sum(fed.map(lambda s: s.store["values"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            total = handle.get(timeout=60)
        assert torch.allclose(total, torch.full((8,), 3.0), atol=2 * 2.0**-24)  # owners 1 and 2
        assert handle.report.owners == ["owner 1", "owner 2"] and handle.report.dropped == ["owner 3"]
        assert any("covers 2 of 3 owners" in str(w.message) for w in caught)


def test_below_the_threshold_the_round_fails_and_nothing_is_revealed(signaling, tmp_path):
    with federation(signaling, tmp_path, [1.0, 2.0, 3.0]) as (procs, scientists, _prints):
        def kill_two(step: str, alive: List[int]) -> None:
            if step == "sharing keys":
                procs[1].kill()
                procs[2].kill()

        fed = duet.Federation(scientists, threshold=2, step_timeout=20, on_step=kill_two)
        with pytest.raises(duet.SecureSumFailed, match="nothing was revealed"):
            fed.secure_sum(fed.map(lambda s: s.store["values"])).get(timeout=60)


def _join_all(scientists, prints, rid, spec, threshold=2, name="values"):
    ptrs = [s.store[name] for s in scientists]
    return [s.session.call({"kind": "secure_sum", "step": "join", "round": rid, "participants": prints, "index": k + 1,
                            "threshold": threshold, "spec": spec.to_wire(), "obj": p.id, "weight": 1,
                            "weights": [1] * len(prints)}, 60, "join")
            for k, (s, p) in enumerate(zip(scientists, ptrs))]


def test_a_forged_key_advert_is_refused(signaling, tmp_path):
    """A hostile scientist relays owner 2's advert with a mask key of its own: owner 1 refuses."""
    with federation(signaling, tmp_path, [1.0, 2.0, 3.0]) as (_procs, scientists, prints):
        spec = Spec((Segment("value", (8,), False),))
        rid = secrets.token_bytes(16)
        adverts = _join_all(scientists, prints, rid, spec)
        from duet.secagg import masks

        forged = dict(adverts[1], mask=bytes(masks.new_key().public_key))
        with pytest.raises(duet.NotAllowed, match="does not verify"):
            scientists[0].session.call({"kind": "secure_sum", "step": "share", "round": rid,
                                        "adverts": [adverts[0], forged, adverts[2]]}, 30, "share")
        with pytest.raises(duet.NotAllowed, match="no such open round"):  # and the round is over for owner 1
            scientists[0].session.call({"kind": "secure_sum", "step": "share", "round": rid, "adverts": adverts}, 30, "share")


def test_a_sybil_federation_is_refused(signaling, tmp_path):
    """Owners 1 and 2 aggregate only with each other and with at least three owners: a scientist
    adding an owner of its own choosing, or summing with fewer owners, is refused."""
    with federation(signaling, tmp_path, [1.0, 2.0]) as (_p, pair, prints):
        pass  # (only to learn the fingerprints the pinned owners will be started with)
    pins = tuple(("--pin", ",".join(prints), "--min-owners", "3") for _ in range(2))
    with federation(signaling, tmp_path, [1.0, 2.0, 3.0], per_owner=pins) as (_procs, scientists, prints3):
        assert prints3[:2] == prints
        fed = duet.Federation(scientists, threshold=2)
        with pytest.raises(duet.SecureSumFailed, match="not one this owner aggregates with"):
            fed.secure_sum(fed.map(lambda s: s.store["values"])).get(timeout=60)
        two = duet.Federation(scientists[:2])
        with pytest.raises(duet.SecureSumFailed, match="requires at least 3"):
            two.secure_sum(two.map(lambda s: s.store["values"])).get(timeout=60)


def test_one_owners_masked_vector_is_uniform(signaling, tmp_path):
    """What a scientist receives from one owner, for an all-constant contribution: uniform words."""
    with federation(signaling, tmp_path, [7.0, 7.0, 7.0]) as (_procs, scientists, prints):
        big = [s.torch.full((50_000,), 7) for s in scientists]  # (the scientist's own here: no approval waits)
        spec = Spec((Segment("value", (50_000,), True),), 0, 2.0**20)
        rid = secrets.token_bytes(16)
        adverts = [s.session.call({"kind": "secure_sum", "step": "join", "round": rid, "participants": prints,
                                   "index": k + 1, "threshold": 2, "spec": spec.to_wire(), "obj": b.id, "weight": 1,
                                   "weights": [1] * len(prints)},
                                  60, "join") for k, (s, b) in enumerate(zip(scientists, big))]
        sealed = [s.session.call({"kind": "secure_sum", "step": "share", "round": rid, "adverts": adverts}, 60, "share")
                  for s in scientists]
        inbox = [{"from": frm + 1, "ct": item["ct"]} for frm in (1, 2) for item in sealed[frm] if item["to"] == 1]
        y = scientists[0].session.call({"kind": "secure_sum", "step": "masked", "round": rid, "sealed": inbox}, 60, "masked")
        words = np.asarray(y).view(np.uint64)
        assert words.shape == (50_000,) and not np.any(words == 7)
        for shift in (56, 24, 0):
            counts = np.bincount(((words >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64), minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-6
