"""Differentially private releases between two real processes over real WebRTC: they go out with
no human until the budget runs out, then BudgetExceeded; nothing without dp= is affected."""
from __future__ import annotations

import time

import pytest
import torch

import duet
from tests.procs.helpers import start_owner, start_signaling

pytestmark = pytest.mark.slow

COHORT = torch.randint(18, 90, (200,), generator=torch.Generator().manual_seed(7)).float()  # as tests/procs/owner.py


@pytest.fixture(scope="module")
def signaling():
    proc, url = start_signaling()
    yield url
    proc.stop()


def test_dp_releases_need_no_human_until_the_budget_is_spent(signaling):
    owner_proc, info = start_owner("--signaling", signaling, "--dp", "1.0")
    try:
        scientist = duet.join(info["code"], name="Dr. Lee", local_only=True)
        cohort = scientist.store["cohort"]
        assert "bounds [0, 120]" in repr(scientist.store)
        mean = cohort.clamp(18, 90).mean()
        for i in range(4):
            start = time.perf_counter()
            handle = mean.request(reason=f"release {i}", dp=0.25)
            value = handle.wait(30)
            assert time.perf_counter() - start < 5  # decided by the owner's rule, not a person
            # noise std: sqrt(2) * (72 / 200) / 0.25 ≈ 2.0; ten of them apart is never seen
            assert abs(float(value) - float(COHORT.mean())) < 20
            assert handle.charge["epsilon"] == 0.25
            assert handle.charge["left_epsilon"] == pytest.approx(0.75 - 0.25 * i)
        with pytest.raises(duet.errors.BudgetExceeded, match="0 is left|over your budget"):
            mean.get(dp=0.25, timeout=30)
        with pytest.raises(duet.errors.BudgetExceeded):
            scientist.dp.histogram(cohort, bins=8, epsilon=0.1).get(timeout=30)
        privacy = scientist.privacy
        assert privacy.spent == pytest.approx(1.0) and privacy.left == pytest.approx(0.0)
        assert len(privacy.releases) == 4
        # An exact release is untouched by any of this: it waits for the owner, as before.
        with pytest.raises(duet.RequestTimeout):
            mean.get(reason="the exact mean", timeout=1.0)
        assert mean.request().status == "pending"
        scientist.close()
    finally:
        rc = owner_proc.stop()
        assert rc == 0, "".join(owner_proc.stderr[-40:])
