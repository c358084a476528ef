"""`numpy.random.<fn>` as a scientist calls it remotely, drawn from the action's torch generator.

The scientist's own random numbers (a shuffled index, simulated noise in their analysis) with
numpy's call signatures and result types; one generator per action, the same one torch random
calls use (`duet.owner.randomness`), so no numpy bit generator runs on the owner. These are not
privacy noise: that comes from vetted libraries only.

Each function takes the action's randomness first; `bind` fixes it, keeping the rest of the
signature for the size checks in `duet.owner.bounds`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

Size = Any  # None, an int, or a tuple of ints, as numpy takes them


def _shape(size: Size) -> Tuple[int, ...]:
    if size is None:
        return ()
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return (int(size),)
    return tuple(int(s) for s in size)


def _out(values: torch.Tensor, size: Size) -> Any:
    """numpy's result: a Python number for size=None, else an array."""
    array = values.numpy()
    return array.item() if size is None else array


def rand(rng: Any, *size: int) -> Any:
    return _out(torch.rand(_shape(size), generator=rng.torch_generator, dtype=torch.float64), size or None)


def randn(rng: Any, *size: int) -> Any:
    return _out(torch.randn(_shape(size), generator=rng.torch_generator, dtype=torch.float64), size or None)


def random(rng: Any, size: Size = None) -> Any:
    return _out(torch.rand(_shape(size), generator=rng.torch_generator, dtype=torch.float64), size)


def uniform(rng: Any, low: Any = 0.0, high: Any = 1.0, size: Size = None) -> Any:
    shape = _shape(size) if size is not None else np.broadcast(low, high).shape
    u = torch.rand(shape, generator=rng.torch_generator, dtype=torch.float64).numpy()
    result = np.asarray(low, dtype=np.float64) + (np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)) * u
    return result.item() if size is None and result.ndim == 0 else result


def normal(rng: Any, loc: Any = 0.0, scale: Any = 1.0, size: Size = None) -> Any:
    if np.any(np.asarray(scale) < 0):
        raise ValueError("scale < 0")
    shape = _shape(size) if size is not None else np.broadcast(loc, scale).shape
    z = torch.randn(shape, generator=rng.torch_generator, dtype=torch.float64).numpy()
    result = np.asarray(loc, dtype=np.float64) + np.asarray(scale, dtype=np.float64) * z
    return result.item() if size is None and result.ndim == 0 else result


def _int_bound(value: Any) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise TypeError("numpy.random.randint on the owner takes int bounds")


def randint(rng: Any, low: Any, high: Any = None, size: Size = None, dtype: Any = int) -> Any:
    lo, hi = (0, _int_bound(low)) if high is None else (_int_bound(low), _int_bound(high))
    if lo >= hi:
        raise ValueError("low >= high")
    values = torch.randint(lo, hi, _shape(size), generator=rng.torch_generator, dtype=torch.int64)
    out = _out(values, size)
    return out if size is None else out.astype(np.dtype(dtype), copy=False)


def permutation(rng: Any, x: Any) -> np.ndarray:
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return torch.randperm(int(x), generator=rng.torch_generator).numpy()
    array = np.asarray(x)
    if array.ndim == 0:
        raise ValueError("x must be an integer or at least 1-dimensional")
    order = torch.randperm(len(array), generator=rng.torch_generator).numpy()
    return array[order]


def choice(rng: Any, a: Any, size: Size = None, replace: bool = True, p: Any = None) -> Any:
    population = np.arange(int(a)) if isinstance(a, (int, np.integer)) and not isinstance(a, bool) else np.asarray(a)
    if population.ndim != 1 or len(population) == 0:
        raise ValueError("a must be a non-empty 1-dimensional array or a positive int")
    shape = _shape(size)
    count = int(np.prod(shape)) if shape else 1
    gen = rng.torch_generator
    if p is not None:
        weights = torch.as_tensor(np.asarray(p, dtype=np.float64))
        if weights.shape != (len(population),) or bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-8:
            raise ValueError("probabilities must be non-negative, one per element of a, and sum to 1")
        picks = torch.multinomial(weights, count, replacement=replace, generator=gen)
    elif replace:
        picks = torch.randint(0, len(population), (count,), generator=gen)
    else:
        if count > len(population):
            raise ValueError("cannot take a larger sample than population when replace=False")
        picks = torch.randperm(len(population), generator=gen)[:count]
    chosen = population[picks.numpy()]
    return chosen[0].item() if size is None else chosen.reshape(shape)


FUNCTIONS: Dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (rand, randn, random, uniform, normal, randint, permutation, choice)
}


def bind(short: str, rng: Any) -> Optional[Callable[..., Any]]:
    """numpy.random.<short> drawing from `rng` (an ActionRandomness), or None if there is none."""
    fn = FUNCTIONS.get(short)
    return functools.partial(fn, rng) if fn is not None else None
