"""numpy.random called remotely: numpy's signatures and result types, drawn from the scientist's generator."""
from __future__ import annotations

import numpy as np
import pytest

import duet

T = 10
CALLS = {
    "rand": (lambda r: r.rand(3, 2), (3, 2), np.float64),
    "randn": (lambda r: r.randn(4), (4,), np.float64),
    "random": (lambda r: r.random(size=(2, 2)), (2, 2), np.float64),
    "uniform": (lambda r: r.uniform(5, 6, size=7), (7,), np.float64),
    "normal": (lambda r: r.normal([0.0, 10.0], 1.0), (2,), np.float64),
    "randint": (lambda r: r.randint(3, 9, size=(5,), dtype="int32"), (5,), np.int32),
    "permutation": (lambda r: r.permutation(6), (6,), np.int64),
    "choice": (lambda r: r.choice([10, 20, 30], size=(2, 2), p=[0.2, 0.3, 0.5]), (2, 2), np.int64),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_numpy_random_shapes_types_and_seeding(pair, name):
    _, scientist = pair
    call, shape, dtype = CALLS[name]
    draws = []
    for _ in range(2):
        scientist.torch.manual_seed(5)
        draws.append(call(scientist.numpy.random).get(timeout=T))
    a, b = draws
    assert isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype
    assert np.array_equal(a, b)  # the same seed, the same numbers


def test_numpy_random_values_follow_numpy_semantics(pair):
    _, scientist = pair
    r = scientist.numpy.random
    assert not np.array_equal(r.permutation(1000).get(timeout=T), r.permutation(1000).get(timeout=T))  # each call draws anew
    assert isinstance(r.rand().get(timeout=T), float) and isinstance(r.randint(5).get(timeout=T), int)
    ints = r.randint(3, 9, size=1000).get(timeout=T)
    assert ints.min() >= 3 and ints.max() <= 8
    u = r.uniform(5, 6, size=1000).get(timeout=T)
    assert u.min() >= 5 and u.max() < 6
    assert sorted(r.permutation([4, 5, 6]).get(timeout=T).tolist()) == [4, 5, 6]
    assert sorted(r.choice(5, size=5, replace=False).get(timeout=T).tolist()) == [0, 1, 2, 3, 4]
    assert abs(float(r.normal(100.0, 2.0, size=20000).get(timeout=T).mean()) - 100.0) < 0.1
    for bad in (lambda: r.normal(0, -1), lambda: r.randint(5, 5), lambda: r.choice(3, size=4, replace=False)):
        with pytest.raises(duet.RemoteError, match="ValueError"):
            bad().get(timeout=T)
