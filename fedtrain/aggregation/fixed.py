"""Exact int64 fixed-point sums: round(w·x·2^bits) added as integers, so any order or grouping of
the additions gives the same bits.

The coordinator's flat integer mean (:class:`FixedPointMean`) and every tree leaf
(:mod:`fedtrain.aggregation.leaf`) round values with these same helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedtrain.aggregation.mean import Aggregator, check_weight

__all__ = [
    "CHUNK",
    "FixedPointMean",
    "fixed_point",
    "fixed_point_add",
    "fixed_point_limit",
    "fixed_point_weight",
]


def fixed_point_limit(n_silos: int) -> float:
    """Largest |w·Δ·2^bits| one update may carry so that n_silos of them cannot overflow int64."""
    return 2.0**62 / max(1, n_silos)


CHUNK = 1 << 20
"""Values converted per step in fixed-point accumulation (bounds the float64 scratch memory)."""


def fixed_point(x: torch.Tensor, weight: float, bits: int, limit: float) -> torch.Tensor:
    """round(w·x·2^bits) as int64: integer sums of these are exact, so any order or grouping
    of the additions gives the same bits.

    Computed in float64 (torch.mul(float32, out=float64) would multiply in float32 first);
    w·2^bits is one float64 number, so each value is rounded once. A value beyond ``limit``
    raises OverflowError instead of wrapping around.
    """
    y = x.to(torch.float64).mul_(weight * 2.0**bits)
    if y.numel():
        lo, hi = torch.aminmax(y)
        peak = max(-float(lo), float(hi))
        if not peak <= limit:
            raise OverflowError(
                f"round.fraction_bits = {bits} is too fine for these updates: |w·Δ|·2^{bits} "
                f"reached {peak:.3g} > {limit:.3g} (int64 could overflow); use fewer bits"
            )
    return torch.round(y, out=y).to(torch.int64)


def fixed_point_add(
    acc: torch.Tensor, x: torch.Tensor, weight: float, bits: int, limit: float, *, first: bool
) -> None:
    """``acc (+)= fixed_point(x, ...)`` in chunks of :data:`CHUNK` values (flat tensors)."""
    for start in range(0, x.numel(), CHUNK):
        q = fixed_point(x[start : start + CHUNK], weight, bits, limit)
        if first:
            acc[start : start + CHUNK].copy_(q)
        else:
            acc[start : start + CHUNK].add_(q)


def fixed_point_weight(weight: float, bits: int) -> int:
    """round(w·2^bits) as a Python int (exact and unbounded, so weight sums never overflow)."""
    return round(weight * 2.0**bits)


class FixedPointMean(Aggregator):
    """Flat weighted mean with exact int64 fixed-point sums: the result has the same bits for
    any arrival order, and a :class:`TreeMean` in int64 mode reproduces it for any tree shape."""

    def __init__(self, fraction_bits: int = 32, max_silos: int = 4096) -> None:
        self.bits = fraction_bits
        self.limit = fixed_point_limit(max_silos)
        self._sum: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        self.total_weight = 0
        """Σ round(w·2^bits), a Python int."""
        self.count = 0

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Add round(w·x·2^bits) to the integer sums."""
        check_weight(weight)
        for n, t in tensors.items():
            x = t.detach().float().reshape(-1)
            first = n not in self._sum
            if first:
                self._sum[n] = torch.empty(x.numel(), dtype=torch.int64)
                self._shapes[n] = t.shape
            fixed_point_add(self._sum[n], x, weight, self.bits, self.limit, first=first)
        self.total_weight += fixed_point_weight(weight, self.bits)
        self.count += 1

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._sum.values())

    def mean(self) -> dict[str, torch.Tensor] | None:
        if self.total_weight <= 0:
            return None
        w = float(self.total_weight)
        return {
            n: (t.to(torch.float64) / w).float().view(self._shapes[n]) for n, t in self._sum.items()
        }
