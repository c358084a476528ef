"""Activations a model can use on encrypted data (CKKS evaluates polynomials, nothing else).

    model = nn.Sequential(nn.Linear(784, 10), duet.he.Square())   # or duet.he.Polynomial([0.5, 0.25, 0.02])

The same modules compute the same polynomials on plain tensors, so a model trained in the clear
runs unchanged on a ciphertext (`duet.owner.he.evaluate`). The scientist's side of encryption is
`scientist.he` (`duet.scientist.he`).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["Square", "Polynomial"]


class Square(torch.nn.Module):
    """x ** 2: the cheapest activation on encrypted data (one multiplicative level)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Polynomial(torch.nn.Module):
    """c0 + c1 x + c2 x^2 + ... (degree 1 to 8): e.g. a low-degree approximation of a sigmoid.

    Each power of x costs a multiplicative level on encrypted data; a published model's
    polynomial is evaluated by TenSEAL's `polyval`, which needs fewer.
    """

    def __init__(self, coefficients: Sequence[float]) -> None:
        super().__init__()
        coeffs = tuple(float(c) for c in coefficients)
        if not 2 <= len(coeffs) <= 9:
            raise ValueError("a polynomial of degree 1 to 8 (2 to 9 coefficients)")
        self.coefficients = coeffs  # plain numbers: a traced model carries them as constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.coefficients[1] + self.coefficients[0]
        power = x
        for c in self.coefficients[2:]:
            power = power * x
            out = out + power * c
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{c:g}" for c in self.coefficients)
