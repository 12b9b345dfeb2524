"""Robust aggregators: coordinate-wise median, trimmed mean, and norm-clipped mean.

Median and trimmed mean need every update of the round at once, so their buffer grows with the
number of silos (config load refuses them with streaming partial sums, trees and coded rounds).
The clipped mean keeps the streaming mean's O(model) buffer.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from fedtrain.aggregation.mean import Aggregator, StreamingMean, check_weight
from fedtrain.transport.payload import LazyTensors

__all__ = ["ClippedMean", "CoordinateMedian", "RobustAggregation", "TrimmedMean"]


class _Held(Aggregator):
    """Keeps each update (fp32) until the round closes."""

    kind = ""

    def __init__(self) -> None:
        self._updates: list[dict[str, torch.Tensor]] = []
        self.senders: list[str] = []

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Keep ``tensors``; robust statistics ignore the weight (every update counts once)."""
        check_weight(weight)
        if weight == 0:
            return
        if self._updates and set(tensors) != set(self._updates[0]):
            raise ValueError(f"update from {sender or '?'} names other tensors than the first")
        self._updates.append({n: t.detach().float().clone() for n, t in tensors.items()})
        self.senders.append(sender)

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self._updates for t in u.values())

    def _stacked(self, name: str) -> torch.Tensor:
        return torch.stack([u[name] for u in self._updates])

    def mean(self) -> dict[str, torch.Tensor] | None:
        if not self._updates:
            return None
        return {n: self._combine(self._stacked(n)) for n in self._updates[0]}

    @abstractmethod
    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        """The per-coordinate statistic over the stacked updates (dim 0)."""

    def report(self) -> dict[str, Any]:
        return {"aggregator": self.kind, "updates": len(self._updates)}


class CoordinateMedian(_Held):
    """Coordinate-wise median (the mean of the two middle values for an even count)."""

    kind = "median"

    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        ordered = stacked.sort(dim=0).values
        if k % 2:
            return ordered[k // 2]
        return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class TrimmedMean(_Held):
    """Coordinate-wise mean after dropping ⌊β·k⌋ smallest and largest values."""

    kind = "trimmed_mean"

    def __init__(self, trim_fraction: float) -> None:
        super().__init__()
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def _combine(self, stacked: torch.Tensor) -> torch.Tensor:
        k = stacked.shape[0]
        drop = math.floor(self.trim_fraction * k)
        kept = stacked.sort(dim=0).values[drop : k - drop]
        return kept.mean(dim=0)

    def report(self) -> dict[str, Any]:
        k = len(self._updates)
        return {**super().report(), "trimmed_each_end": math.floor(self.trim_fraction * k)}


class ClippedMean(StreamingMean):
    """Weighted mean of updates whose global L2 norm is first clipped to ``clip_norm``."""

    def __init__(self, clip_norm: float) -> None:
        super().__init__()
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = clip_norm
        self.clipped: list[str] = []

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        norm = math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors.values()))
        if norm > self.clip_norm:
            scale = self.clip_norm / norm
            if isinstance(tensors, LazyTensors):  # stays lazy: scaled as each is decoded
                tensors = tensors.scaled(scale)
            else:
                tensors = {n: t.detach().float() * scale for n, t in tensors.items()}
            self.clipped.append(sender)
        super().add(tensors, weight, sender, meta)

    def report(self) -> dict[str, Any]:
        return {"aggregator": "clipped_mean", "clipped": list(self.clipped)}


class RobustAggregation:
    """The strategy's aggregation plug-in for ``strategy.aggregator`` (a new aggregator per
    round; nothing to release)."""

    def __init__(self, kind: str, trim_fraction: float = 0.1, clip_norm: float = 1.0) -> None:
        if kind not in ("median", "trimmed_mean", "clipped_mean"):
            raise ValueError(f"unknown robust aggregator {kind!r}")
        self.kind = kind
        self.trim_fraction = trim_fraction
        self.clip_norm = clip_norm

    def new_aggregator(self) -> Aggregator:
        if self.kind == "median":
            return CoordinateMedian()
        if self.kind == "trimmed_mean":
            return TrimmedMean(self.trim_fraction)
        return ClippedMean(self.clip_norm)

    def close(self) -> None:
        return None
