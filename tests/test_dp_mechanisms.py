"""Each mechanism, measured: over many draws the noise has the stated scale, and the empirical
privacy loss between two neighbouring datasets stays within epsilon.

Tolerances are a number of standard errors computed from the counts themselves, wide enough that
a correct mechanism fails with a probability far below one in a million, and narrow enough that a
mechanism with half the noise (twice the privacy loss) fails every time.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from duet.owner.privacy import facts, mechanisms, training
from duet.owner.privacy.mechanisms import Plan
from duet.owner.randomness import Randomness

Z = 6.0  # standard errors allowed


def _discrete_laplace_variance(scale: float) -> float:
    a = math.exp(-1.0 / scale)
    return 2 * a / (1 - a) ** 2


@pytest.mark.parametrize("sensitivity, epsilon", [(1, 0.5), (144, 1.0), (2, 0.1)])
def test_discrete_laplace_noise_has_the_stated_scale(sensitivity, epsilon):
    plan = Plan("discrete Laplace", epsilon, 1.0, sensitivity, mechanisms._scale(sensitivity, epsilon), 1.0)
    assert plan.scale == pytest.approx(sensitivity / epsilon)
    n = 200_000
    noise = mechanisms._laplace(np.zeros(n, dtype=np.int64), plan).astype(np.float64)
    var = _discrete_laplace_variance(plan.scale)
    assert abs(noise.mean()) < Z * math.sqrt(var / n)
    # The variance of a sample variance of Laplace noise is about 5 var^2 / n (kurtosis 6).
    assert abs(noise.var() - var) < Z * math.sqrt(5 / n) * var
    assert np.all(noise == np.round(noise))  # integers: no floating-point noise to attack


def _max_log_ratio(a: np.ndarray, b: np.ndarray, min_count: int) -> tuple:
    """The largest |log P(a = v) / P(b = v)| over values seen often in both, and its standard error."""
    values = np.union1d(a, b)
    ua, na = np.unique(a, return_counts=True)
    ub, nb = np.unique(b, return_counts=True)
    ca = np.zeros(len(values))
    cb = np.zeros(len(values))
    ca[np.searchsorted(values, ua)] = na
    cb[np.searchsorted(values, ub)] = nb
    keep = (ca >= min_count) & (cb >= min_count)
    ratios = np.abs(np.log(ca[keep] / cb[keep]))
    se = np.sqrt(1 / ca[keep] + 1 / cb[keep])
    i = int(np.argmax(ratios - Z * se))
    return float(ratios.max()), float(ratios[i]), float(se[i])


@pytest.mark.parametrize("epsilon, sensitivity", [(0.5, 1), (1.0, 4), (0.3, 2)])
def test_the_empirical_privacy_loss_of_a_sum_stays_within_epsilon(epsilon, sensitivity):
    """Two neighbours whose exact totals differ by the full sensitivity (the worst case the
    property tests allow), noised as a release would be."""
    plan = Plan("discrete Laplace", epsilon, 1.0, sensitivity, mechanisms._scale(sensitivity, epsilon), 1.0)
    n = 200_000
    a = mechanisms._laplace(np.full(n, 10_000, dtype=np.int64), plan)
    b = mechanisms._laplace(np.full(n, 10_000 + sensitivity, dtype=np.int64), plan)
    worst, ratio, se = _max_log_ratio(a, b, min_count=1000)
    assert ratio <= epsilon + Z * se, (worst, epsilon)
    assert worst >= epsilon * 0.8  # the loss does reach epsilon: the noise is not needlessly large


def test_the_loss_check_catches_a_mechanism_with_half_the_noise():
    """The check above is not vacuous: noise scaled for half the sensitivity fails it."""
    epsilon, sensitivity = 0.5, 2
    plan = Plan("discrete Laplace", epsilon, 1.0, sensitivity, mechanisms._scale(sensitivity, epsilon) / 2, 1.0)
    n = 200_000
    a = mechanisms._laplace_unchecked(np.full(n, 0, dtype=np.int64), plan)
    b = mechanisms._laplace_unchecked(np.full(n, sensitivity, dtype=np.int64), plan)
    _worst, ratio, se = _max_log_ratio(a, b, min_count=1000)
    assert ratio > epsilon + Z * se


def test_a_mean_release_is_noised_for_its_sensitivity_on_the_grid():
    """A float mean: the grid, the sensitivity in grid steps, and the noise in value units agree."""
    rows = facts.Rows(asset=None, axis=0, shape=(1000, 1), lo=np.array([[0.0]]), hi=np.array([[120.0]]), nan=False,
                      integral=False, step=facts.Step(lambda: None), ops=("ages",), exemplar=np.zeros((1, 1)))
    fact = facts.Aggregate(rows=rows, kind="mean", dims=(0, 1), form=np.float64(0))
    plan = mechanisms.plan(fact, 0.5)
    assert plan.grid == 2.0 ** (math.floor(math.log2(120 / 0.5)) - mechanisms.GRID_BITS)
    assert plan.sensitivity * plan.grid == pytest.approx(120.0)
    # noise std in the mean's units: sqrt(2) * (120 / epsilon) / rows
    assert plan.public()["noise_std"] == pytest.approx(math.sqrt(2) * 240 / 1000, rel=1e-4)
    assert plan.public()["sensitivity"] == pytest.approx(120 / 1000)


def test_the_quantile_mechanism_stays_within_epsilon():
    """OpenDP's exponential mechanism over candidates, on two tables that differ in one row."""
    epsilon = 1.0
    candidates = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    data = np.array([[v] for v in [5.0, 12.0, 18.0, 22.0, 25.0, 28.0, 33.0, 35.0, 38.0]])
    other = data.copy()
    other[0, 0] = 40.0  # one row replaced: the median moves
    results = []
    for table in (data, other):
        rows = facts.Rows(asset=None, axis=0, shape=table.shape, lo=np.array([[0.0]]), hi=np.array([[40.0]]), nan=False,
                          integral=False, step=facts.Step(lambda t=table: t), ops=("x",), exemplar=np.zeros((1, 1)))
        fact = facts.Aggregate(rows=rows, kind="quantile", dims=(0, 1), alpha=0.5, candidates=candidates, form=np.float64(0))
        plan = mechanisms.plan(fact, epsilon)
        results.append(np.array([mechanisms.release(fact, plan) for _ in range(8_000)]))
    assert set(np.unique(results[0])) <= set(candidates)
    worst, ratio, se = _max_log_ratio(results[0], results[1], min_count=500)
    assert ratio <= epsilon + Z * se, worst


def test_dp_sgd_noise_has_the_stated_scale_and_is_secret():
    """One DP-SGD step where every per-example gradient is zero: the update is the noise alone,
    N(0, (noise_multiplier * max_grad_norm / batch)^2) per weight, drawn from a secret generator."""
    n, features = 64, 500
    data = torch.utils.data.TensorDataset(torch.zeros(n, features), torch.zeros(n, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.Linear(features, 20, bias=False), torch.nn.LogSoftmax(dim=1))
    torch.nn.init.zeros_(model[0].weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    spec = training.Spec(epochs=1, batch_size=n, max_grad_norm=2.0, noise_multiplier=1.5, target_epsilon=None, loss="nll_loss")
    updates = []
    for _ in range(2):
        seeded = Randomness()
        seeded.manual_seed(0)  # the scientist's seed does not decide the noise
        outcome = training.train(model, optimizer, data, spec, 1e-5, reserve=lambda spend: _Reservation(),
                                 randomness=seeded.for_action(), progress=lambda done, total: None)
        assert outcome.steps == 1
        updates.append(outcome.model[0].weight.detach().reshape(-1).numpy().astype(np.float64))
    std = 1.5 * 2.0 / n
    for u in updates:
        assert abs(u.std() - std) < Z * std / math.sqrt(2 * u.size)
        assert abs(u.mean()) < Z * std / math.sqrt(u.size)
    assert not np.array_equal(updates[0], updates[1])
    assert torch.count_nonzero(model[0].weight) == 0  # the scientist's model is untouched


class _Reservation:
    def commit(self) -> None:
        pass

    def refund(self) -> None:
        pass
