"""DiLoCo outer step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training").

Each silo returns Δ_i = θ^(t−1) − θ_i after H inner steps; the coordinator averages them
(token-weighted by default) and takes an outer Nesterov-SGD step with p.grad = Δ. FedAvg is the
special case outer lr 1.0 without momentum — the same code with other numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedtrain.protocol.work import TrainWork, Work
from fedtrain.strategies.base import AggregationPlugin, OuterOptimizerStrategy, step_some
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config, StrategySection

__all__ = ["SPECS", "DiLoCo", "aggregation_for", "outer_settings"]


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

    def outer_parts(self, round: int) -> list[list[str]]:
        """One parameter at a time (SGD steps each from its own gradient and momentum)."""
        return [[n] for n in sorted(self.update_names(round) or self.params)]

    def step_part(self, mean_update: dict[str, torch.Tensor], round: int, names: list[str]) -> None:
        step_some(self.optimizer, self.params, mean_update, names)


def outer_settings(s: StrategySection) -> dict[str, Any]:
    """Outer optimizer settings: the configured ones, or FedAvg's (SGD lr 1, no momentum)."""
    if s.name == "fedavg":
        return {"lr": 1.0, "momentum": 0.0, "nesterov": False}
    return {"lr": s.outer_lr, "momentum": s.outer_momentum, "nesterov": s.nesterov}


def aggregation_for(cfg: Config, params: dict[str, torch.nn.Parameter]) -> Any:
    """The configured robust aggregator, tree or int64 sum (None: the flat fp32 mean)."""
    s = cfg.strategy
    if s.aggregator != "mean":  # config load refuses robust aggregators with trees / int64
        from fedtrain.aggregation.robust import RobustAggregation

        return RobustAggregation(s.aggregator, s.trim_fraction, s.clip_norm)
    from fedtrain.aggregation.tree import aggregation_from_config

    return aggregation_from_config(cfg, numel=sum(p.numel() for p in params.values()))


def _build(cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext) -> DiLoCo:
    return DiLoCo(
        params,
        inner_steps=cfg.train.inner_steps,
        weighting=cfg.strategy.weighting,
        aggregation=aggregation_for(cfg, params),
        **outer_settings(cfg.strategy),
    )


def _inner_steps(cfg: Config) -> int:
    return cfg.train.inner_steps


_ROBUST = ("aggregator", "trim_fraction", "clip_norm")
SPECS = (
    StrategySpec(
        name="diloco",
        summary="DiLoCo (Douillard et al. 2023): outer Nesterov SGD on averaged pseudo-gradients",
        fields=("outer_lr", "outer_momentum", "nesterov", "weighting", *_ROBUST),
        trees=True,
        robust=True,
        analytic="diloco",
        steps_per_round=_inner_steps,
        build=_build,
    ),
    StrategySpec(
        name="fedavg",
        summary="FedAvg (McMahan et al. 2017): DiLoCo with outer SGD lr 1 and no momentum",
        fields=("weighting", *_ROBUST),
        trees=True,
        robust=True,
        steps_per_round=_inner_steps,
        build=_build,
    ),
)
"""DiLoCo and its FedAvg preset."""
