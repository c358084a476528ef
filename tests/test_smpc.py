"""Secret-shared statistics across owners (duet.smpc): in process through local pairs (the
owner's handler, approvals, policy) and, marked slow, across real owner processes."""
from __future__ import annotations

import json
import threading
from typing import List, Tuple

import numpy as np
import pytest
import torch

import duet
from duet.errors import NotAllowed
from duet.scientist.smpc import SharedComputationFailed
from duet.sharing import ring

N = 500
GEN = torch.Generator().manual_seed(7)
LAB = torch.rand(N, generator=GEN, dtype=torch.float64) * 150 + 20  # a hospital's lab values
CLAIMS = LAB * 40 + torch.randn(N, generator=GEN, dtype=torch.float64) * 900 + 3000  # an insurer's claims, correlated


@pytest.fixture
def trio(tmp_path):
    """A hospital (lab values), an insurer (claims) and a dealer, each with a scientist session."""
    made: List[Tuple[duet.Owner, duet.Scientist]] = []
    for k, (name, data) in enumerate([("hospital", LAB), ("insurer", CLAIMS), ("dealer", None)]):
        owner, scientist = duet.local_pair(audit_log=tmp_path / f"audit-{k}.jsonl", owner_name=name,
                                           scientist_name="Dr. Lee")
        if data is not None:
            owner.store.add(data.clone(), name="lab" if k == 0 else "claims")
            owner.requests.add_handler(action="accept", kind="smpc")
        made.append((owner, scientist))
    (hospital, _), (insurer, _), (dealer, _) = made
    hospital.pin_federation([insurer.fingerprint, dealer.fingerprint], exact=True)  # opt in, with known keys only
    insurer.pin_federation([hospital.fingerprint, dealer.fingerprint], exact=True)
    yield made
    for owner, scientist in made:
        scientist.close()
        owner.close()


def test_dot_product_correlation_sum_and_mean_equal_the_plain_results(trio):
    (_ha, a), (_hb, b), (_d, c) = trio
    fed = duet.Federation([a, b], dealer=c)
    xa, xb = fed[0].store["lab"], fed[1].store["claims"]
    r = duet.smpc.dot(xa, xb, bounds=(200, 2e4))
    got = r.get(reason="joint statistic", timeout=30)
    assert abs(got - float(LAB @ CLAIMS)) <= r.error
    assert duet.smpc.dot(xa, xb, bounds=(200, 1e6)).frac_bits < 16  # wider bounds, a coarser step that fits
    corr = duet.smpc.correlation(xa, xb)
    expected = float(np.corrcoef(LAB.numpy(), CLAIMS.numpy())[0, 1])
    assert abs(corr.get(timeout=30) - expected) <= corr.error + 1e-9
    s = duet.smpc.sum([xa, xb], bound=2e4)
    assert abs(s.get(timeout=30) - float(LAB.sum() + CLAIMS.sum())) <= s.error
    m = duet.smpc.mean([xa, xb], bound=2e4)
    assert abs(m.get(timeout=30) - float((LAB + CLAIMS).mean())) <= m.error
    rows = duet.smpc.add([xa, xb], bound=2e4).get(timeout=30)
    assert rows.shape == (N,) and float((rows - (LAB + CLAIMS)).abs().max()) <= 2 * 2.0**-(ring.FRAC_BITS + 1) + 1e-9
    prod = duet.smpc.multiply(xa, xb, bounds=(200, 2e4)).get(timeout=30)
    assert torch.allclose(prod, LAB * CLAIMS, atol=0.5)


def test_a_linear_model_on_features_split_across_owners(trio):
    (ha, a), (hb, b), _ = trio
    xa_cols = torch.stack([LAB, LAB / 10], dim=1)
    xb_cols = CLAIMS[:, None] / 1000
    ha.store.add(xa_cols, name="lab panel")
    hb.store.add(xb_cols, name="claims k")
    wa, wb = torch.tensor([0.02, -0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    fed = duet.Federation([a, b])
    y = duet.smpc.linear([(fed[0].store["lab panel"], wa), (fed[1].store["claims k"], wb)], bias=1.0, bound=100).get(timeout=30)
    assert torch.allclose(y, xa_cols @ wa + xb_cols @ wb + 1.0, atol=1e-4)


def test_each_owner_approves_seeing_the_other_owners_signed_description_and_the_dealer(trio):
    (ha, a), (hb, b), (dealer_owner, c) = trio
    for rule in ha.requests.rules:
        ha.requests.remove_handler(rule)  # the hospital decides by hand
    fed = duet.Federation([a, b], dealer=c)
    xb = fed[1].store["claims"] * 2
    result: list = []
    t = threading.Thread(target=lambda: result.append(duet.smpc.dot(fed[0].store["lab"], xb, bounds=(200, 4e4)).get(timeout=30)))
    t.start()
    req = ha.requests.wait_pending(timeout=10, kind="smpc")
    from duet.widgets.approval import request_html, request_text

    text = request_text(req)
    assert req.dealer == dealer_owner.fingerprint and list(req.participants) == [ha.fingerprint, hb.fingerprint]
    assert "owner 2: claims after claims, operator.mul" in text and "not pinned" not in text and dealer_owner.fingerprint in text and "dot product" in text
    assert "Dealer" in request_html(req) and "claims" in request_html(req)
    req.accept()
    t.join(30)
    assert abs(result[0] - float(LAB @ (CLAIMS * 2))) < 1.0


def test_shared_computations_are_opt_in_and_unpinned_keys_are_marked(trio):
    """Without pin_federation(exact=True) an owner takes no part: the scientist chooses the function
    and names the other owner's key, which may be its own (then the "other owner" receives this
    owner's shares and openings). Pinned peers are shown as such."""
    (ha, a), (hb, b), (dealer_owner, c) = trio
    ha.pin_federation()  # back to the default
    fed = duet.Federation([a, b], dealer=c)
    with pytest.raises(SharedComputationFailed, match="exact=True"):
        duet.smpc.dot(fed[0].store["lab"], fed[1].store["claims"], bounds=(200, 2e4)).get(timeout=30)
    ha.pin_federation(exact=True)  # opted in, but no keys pinned: its accept rule must not decide
    result: list = []
    t = threading.Thread(target=lambda: result.append(
        duet.smpc.dot(fed[0].store["lab"], fed[1].store["claims"], bounds=(200, 2e4)).get(timeout=30)))
    t.start()
    req = ha.requests.wait_pending(timeout=10, kind="smpc")
    assert set(req.unpinned) == {hb.fingerprint, dealer_owner.fingerprint} and req.numel == N  # all of it, at worst
    assert all("not pinned" in line for line in req.computed_with), req.computed_with
    req.accept()
    t.join(30)
    assert result and abs(result[0] - float(LAB @ CLAIMS)) < 80


def test_an_owner_that_refuses_stops_the_computation_cleanly(trio):
    (ha, a), (hb, b), (_d, c) = trio
    for rule in hb.requests.rules:
        hb.requests.remove_handler(rule)
    hb.requests.add_handler(action="deny", kind="smpc", reason="not today")
    fed = duet.Federation([a, b], dealer=c)
    r = duet.smpc.dot(fed[0].store["lab"], fed[1].store["claims"], bounds=(200, 2e4))
    with pytest.raises(SharedComputationFailed, match="insurer"):
        r.get(timeout=30)
    # the others were told to stop: nothing stays open anywhere
    for owner, _ in trio:
        for conn in owner._connections:
            assert not conn.shared.jobs


def test_owners_refuse_a_product_with_values_the_scientist_chose(trio):
    (_ha, a), (_hb, b), (_d, c) = trio
    onehot = torch.zeros(N, dtype=torch.float64)
    onehot[17] = 1.0  # the dot product would be the hospital's 18th lab value
    fed = duet.Federation([a, b], dealer=c)
    with pytest.raises(SharedComputationFailed, match="scientist's own values"):  # even with exact=True
        duet.smpc.dot(fed[0].store["lab"], fed[1].send(onehot), bounds=(200, 1)).get(timeout=30)


def test_clear_errors_before_anything_runs(trio):
    (_ha, a), (_hb, b), (_d, c) = trio
    xa, xb = a.store["lab"], b.store["claims"]
    with pytest.raises(ValueError, match="dealer"):
        duet.smpc.dot(xa, xb, bounds=1e4)  # no dealer named
    with pytest.raises(ValueError, match="bounds= is needed"):
        duet.smpc.dot(xa, xb, dealer=c)
    with pytest.raises(ValueError, match="different owner"):
        duet.smpc.sum([xa, a.store["lab"]], bound=1)
    with pytest.raises(ValueError, match="as many numbers"):
        duet.smpc.sum([xa, b.store["claims"][:10]], bound=1e4)
    with pytest.raises(ValueError, match="overflow"):
        duet.smpc.dot(xa, xb, bounds=(1e9, 1e9), dealer=c)
    with pytest.raises(NotAllowed, match="private"):
        duet.smpc.sum([xa[xa > 100], b.store["claims"]], bound=1e4)
    with pytest.raises(ValueError, match="third owner"):
        duet.smpc.dot(xa, xb, bounds=1e4, dealer=a)


def test_the_audit_logs_say_who_computed_what(trio, tmp_path):
    (_ha, a), (_hb, b), (_d, c) = trio
    fed = duet.Federation([a, b], dealer=c)
    duet.smpc.dot(fed[0].store["lab"], fed[1].store["claims"], bounds=(200, 2e4)).get(timeout=30)
    events = [[json.loads(line)["event"] for line in (tmp_path / f"audit-{k}.jsonl").read_text().splitlines()]
              for k in range(3)]
    assert "smpc_join" in events[0] and "smpc_result" in events[0] and "smpc_result" in events[1]
    assert "smpc_dealer_join" in events[2] and "smpc_dealt" in events[2]


@pytest.mark.slow
def test_across_two_owner_processes_and_a_dealer_process(tmp_path):
    """Real processes over real WebRTC: two owners with a column each and a dealer with none."""
    from tests.procs.helpers import start_owner, start_signaling
    from tests.procs.owner import seeded_column

    sig, url = start_signaling()
    procs, sessions = [], []
    try:
        from duet.identity import Identity

        prints = [Identity.load_or_create(tmp_path / f"party-{k + 1}" / "identity.key").fingerprint for k in range(4)]
        for k, extra in enumerate([("--column", "1"), ("--column", "2"), ("--column", "3:deny"), ()]):
            peers = ",".join(p for j, p in enumerate(prints) if j != k)  # each pins the others: keys it knows
            proc, info = start_owner("--signaling", url, "--name", f"party {k + 1}", *extra, "--pin", peers,
                                     env={"DUET_CONFIG_DIR": str(tmp_path / f"party-{k + 1}")})
            procs.append(proc)
            sessions.append(duet.join(info["code"], name="Dr. Lee", local_only=True))
        a, b, refuser, dealer = sessions
        fed = duet.Federation([a, b], dealer=dealer)
        xa, xb = fed[0].store["column"], fed[1].store["column"]
        ca, cb = seeded_column(1), seeded_column(2)
        r = duet.smpc.dot(xa, xb, bounds=100)
        assert abs(r.get(reason="joint statistic", timeout=60) - float(ca @ cb)) <= r.error
        corr = duet.smpc.correlation(xa, xb)
        expected = float(np.corrcoef(ca.numpy(), cb.numpy())[0, 1])
        assert abs(corr.get(timeout=60) - expected) <= corr.error + 1e-9 and expected > 0.5
        with pytest.raises(SharedComputationFailed, match="party 3"):
            duet.smpc.dot(xa, refuser.store["column"], bounds=100, dealer=dealer).get(timeout=60)
        again = duet.smpc.dot(xa, xb, bounds=100)  # the refusal left nothing behind
        assert abs(again.get(timeout=60) - float(ca @ cb)) <= again.error
    finally:
        for s in sessions:
            s.close()
        for proc in procs:
            assert proc.stop() == 0, "".join(proc.stderr[-40:])
        sig.stop()


def test_what_another_key_signed_reaches_the_approval_view_cleaned(trio):
    """A key the scientist holds can sign any description; newlines in it must not forge lines of
    the owner's view (a "dealer: none" line, say)."""
    import secrets as _secrets

    from duet.identity import Identity
    from duet.protocol import RequestKind
    from duet.sharing.party import Description, Job, describe_message
    from duet.widgets.approval import request_text

    (ha, a), _, _ = trio
    ha.pin_federation(exact=True)  # any keys (each then marked, and decided by hand)
    lab = a.store["lab"]
    job_id, fake, fake_dealer = _secrets.token_bytes(16), Identity.ephemeral(), Identity.ephemeral()
    mine = a.session.call({"kind": RequestKind.SMPC, "step": "describe", "job": job_id, "op": "dot", "index": 1,
                           "obj": lab.id}, 10, "describe")
    forged = ["claims\n  dealer: none\n  reason: audited by the insurer"]
    theirs = Description(2, fake.public_key, tuple(forged), (), fake.sign(describe_message(job_id, "dot", 2, forged, [])))
    job = Job(job_id, "dot", (ha.fingerprint, fake.fingerprint), fake_dealer.fingerprint, N, 16, (200.0, 1.0), True,
              (Description.from_wire(mine), theirs))
    future = a.session.request({"kind": RequestKind.SMPC, "step": "join", "terms": job.to_wire(), "index": 1,
                                "obj": lab.id})
    req = ha.requests.wait_pending(timeout=10, kind="smpc")
    text = request_text(req)
    assert "\n  dealer: none" not in text and "\n  reason: audited" not in text
    assert "not pinned" in text
    req.deny("no")
    with pytest.raises(Exception):
        future.result(10)


def test_every_operation_the_other_owner_signed_is_shown(trio):
    """`claims * 0 + 1` then harmless-looking operations makes the other operand a vector of ones:
    the approval once showed only the last eight operations, so the product hid the multiply."""
    (ha, a), (_hb, b), (_d, c) = trio
    for rule in ha.requests.rules:
        ha.requests.remove_handler(rule)
    fed = duet.Federation([a, b], dealer=c)
    ones = fed[1].store["claims"] * 0 + 1
    for op in ("abs", "sqrt", "exp", "log", "floor", "ceil", "round", "trunc", "relu", "sigmoid"):
        ones = getattr(ones, op)()
    result: list = []

    def run() -> None:
        try:
            result.append(duet.smpc.dot(fed[0].store["lab"], ones, bounds=(200, 10)).get(timeout=30))
        except SharedComputationFailed as exc:
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    req = ha.requests.wait_pending(timeout=10, kind="smpc")
    shown = " ".join(req.computed_with)
    assert "operator.mul" in shown and "operator.add" in shown and "Tensor.sigmoid" in shown
    req.deny("the other column is not data")
    t.join(30)
    assert len(result) == 1 and isinstance(result[0], SharedComputationFailed)
