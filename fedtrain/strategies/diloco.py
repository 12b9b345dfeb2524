"""DiLoCo outer step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training").

Each silo returns Δ_i = θ^(t−1) − θ_i after H inner steps; the coordinator averages them
(token-weighted by default) and takes an outer Nesterov-SGD step with p.grad = Δ. FedAvg is the
special case outer lr 1.0 without momentum — the same code with other numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtrain.protocol.work import TrainWork, Work
from fedtrain.strategies.base import AggregationPlugin, OuterOptimizerStrategy

__all__ = ["DiLoCo"]


class DiLoCo(OuterOptimizerStrategy):
    """Outer Nesterov SGD on averaged pseudo-gradients (defaults: lr 0.7, momentum 0.9)."""

    name = "diloco"
    reply_kind = "pseudo_grad"

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        *,
        inner_steps: int,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        weighting: str = "tokens",
        aggregation: AggregationPlugin | None = None,
    ) -> None:
        super().__init__(params)
        if weighting not in ("tokens", "equal"):
            raise ValueError(f"weighting must be 'tokens' or 'equal', got {weighting!r}")
        self.inner_steps = inner_steps
        self.weighting = weighting
        self.aggregation = aggregation
        """Tree, int64 or robust aggregation (None: the flat fp32 streaming mean)."""
        # torch rejects Nesterov without momentum; FedAvg (momentum 0) is plain SGD.
        self.optimizer = torch.optim.SGD(
            list(params.values()), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0
        )

    @classmethod
    def fedavg(
        cls,
        params: dict[str, torch.nn.Parameter],
        *,
        inner_steps: int,
        weighting: str = "tokens",
        aggregation: AggregationPlugin | None = None,
    ) -> DiLoCo:
        """FedAvg (McMahan et al. 2017) = DiLoCo with outer SGD lr 1.0 and no momentum."""
        return cls(
            params,
            inner_steps=inner_steps,
            lr=1.0,
            momentum=0.0,
            nesterov=False,
            weighting=weighting,
            aggregation=aggregation,
        )

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        h = min(self.inner_steps, steps)
        return {s: TrainWork(steps=h) for s in silos}

    def weight(self, meta: dict[str, Any]) -> float:
        return float(meta.get("tokens", 0)) if self.weighting == "tokens" else 1.0

    def step(self, mean_update: dict[str, torch.Tensor], round: int) -> None:
        self._apply_grads(mean_update)
