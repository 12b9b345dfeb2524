"""Streaming weighted mean: a running Σ w·x and Σ w, O(model) memory whatever the silo count."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Aggregator", "StreamingMean", "check_weight"]


def check_weight(weight: float) -> None:
    """Aggregation weights are >= 0 (a negative one would flip an update)."""
    if weight < 0:
        raise ValueError(f"aggregation weight must be >= 0, got {weight}")


class Aggregator(ABC):
    """How a round's accepted replies become the update the outer step uses."""

    @abstractmethod
    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Take one accepted reply (``meta``: its metadata plus ``staleness`` in rounds)."""

    @abstractmethod
    def mean(self) -> dict[str, torch.Tensor] | None:
        """The update for the outer step, or None when nothing usable arrived."""

    @property
    @abstractmethod
    def buffer_bytes(self) -> int:
        """Bytes the aggregator holds."""

    def done(self) -> bool:
        """True when more replies cannot change the result (close the round now); by default
        the round's close condition decides."""
        return False

    def tokens(self, counted: int) -> int:
        """Tokens the result stands for, given ``counted`` reported by the accepted replies."""
        return counted

    def report(self) -> dict[str, Any]:
        """Facts about how the result was formed, for the round's record."""
        return {}


class StreamingMean(Aggregator):
    """Accumulates replies as they arrive; never holds more than one sum buffer per tensor."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Add ``weight * tensors`` (fp32 accumulation), one tensor at a time (a lazily decoded
        reply is decoded tensor by tensor, never whole)."""
        check_weight(weight)
        for n, t in tensors.items():
            buf = self._sum.get(n)
            if buf is None:
                self._sum[n] = t.detach().float() * weight
            else:
                buf.add_(t.detach().float(), alpha=weight)
        self.total_weight += weight
        self.count += 1

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the accumulator (independent of the number of replies)."""
        return sum(t.numel() * t.element_size() for t in self._sum.values())

    def mean(self) -> dict[str, torch.Tensor] | None:
        """Σ w·x / Σ w, or None when nothing with positive weight arrived. Divides the sum in
        place (no second model-sized buffer): call it once, after the last :meth:`add`."""
        if self.total_weight <= 0:
            return None
        for t in self._sum.values():
            t.div_(self.total_weight)
        return self._sum
