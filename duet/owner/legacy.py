"""The legacy constructors older notebooks call (`torch.Tensor(...)`, `torch.FloatTensor(...)`), made safe.

`torch.Tensor(3, 4)` returns uninitialised memory, which could hold the owner's earlier data:
sizes give zeros instead. Data (a list, an array) is copied, as `torch.tensor` does.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def _legacy(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    def make(*args: Any) -> torch.Tensor:
        if not args:
            return torch.zeros(0, dtype=dtype)
        if len(args) == 1 and isinstance(args[0], torch.Size):
            args = tuple(args[0])
        if all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            return torch.zeros(*args, dtype=dtype)
        if len(args) == 1 and isinstance(args[0], (list, tuple, np.ndarray, torch.Tensor, float, bool)):
            data = args[0]
            if isinstance(data, torch.Tensor):
                return data.detach().clone().to(dtype)
            return torch.tensor(data, dtype=dtype)
        raise TypeError("torch.Tensor(...) takes sizes (ints) or one sequence of data; use torch.tensor(data)")

    return make


Tensor = _legacy(torch.float32)
FloatTensor = _legacy(torch.float32)
DoubleTensor = _legacy(torch.float64)
HalfTensor = _legacy(torch.float16)
LongTensor = _legacy(torch.int64)
IntTensor = _legacy(torch.int32)
ShortTensor = _legacy(torch.int16)
ByteTensor = _legacy(torch.uint8)
BoolTensor = _legacy(torch.bool)

NAMES = ("Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "LongTensor", "IntTensor", "ShortTensor", "ByteTensor",
         "BoolTensor")
