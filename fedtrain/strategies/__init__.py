"""Outer algorithms: DiLoCo (FedAvg as its preset), Streaming DiLoCo, the data-parallel baseline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedtrain.aggregation.tree import aggregation_from_config
from fedtrain.config import Config, StrategySection
from fedtrain.strategies.base import OuterOptimizerStrategy, Strategy, Work
from fedtrain.strategies.ddp import DataParallel
from fedtrain.strategies.diloco import DiLoCo
from fedtrain.strategies.streaming import StreamingDiLoCo

__all__ = [
    "DataParallel",
    "DiLoCo",
    "OuterOptimizerStrategy",
    "Strategy",
    "StreamingDiLoCo",
    "Work",
    "build_strategy",
]


def _outer(s: StrategySection) -> dict[str, Any]:
    """Outer optimizer settings: the configured ones, or FedAvg's (SGD lr 1, no momentum)."""
    if s.name == "fedavg":
        return {"lr": 1.0, "momentum": 0.0, "nesterov": False}
    return {"lr": s.outer_lr, "momentum": s.outer_momentum, "nesterov": s.nesterov}


def build_strategy(
    cfg: Config,
    params: dict[str, torch.nn.Parameter],
    *,
    run_id: str = "",
    clock: Callable[[], float | None] | None = None,
) -> Strategy:
    """The strategy named by ``cfg.strategy.name`` over the global ``params``; ``clock`` is
    the engine's (seconds now, None: real time) for strategies that schedule by time."""
    s = cfg.strategy
    if s.coding != "off":
        from fedtrain.strategies.coded import CodedDiLoCo

        return CodedDiLoCo(
            params,
            silos=cfg.data.silos,
            stragglers=s.stragglers,
            coding=s.coding,
            inner_steps=cfg.train.inner_steps,
            tokens_per_step=cfg.train.tokens_per_step,
            **_outer(s),
        )
    if s.scheduling == "compass":
        from fedtrain.strategies.compass import CompassDiLoCo

        return CompassDiLoCo(
            params,
            inner_steps=cfg.train.inner_steps,
            q_min=s.q_min,
            q_max=s.q_max,
            weighting=s.weighting,
            clock=clock,
            **_outer(s),
        )
    # Tree / int64 aggregation (config load refuses it for the strategies above and below).
    aggregation: Any
    if s.aggregator != "mean":  # config load refuses robust aggregators with trees / int64
        from fedtrain.aggregation.robust import RobustAggregation

        aggregation = RobustAggregation(s.aggregator, s.trim_fraction, s.clip_norm)
    else:
        aggregation = aggregation_from_config(cfg, numel=sum(p.numel() for p in params.values()))
    if s.name == "diloco":
        return DiLoCo(
            params,
            inner_steps=cfg.train.inner_steps,
            lr=s.outer_lr,
            momentum=s.outer_momentum,
            nesterov=s.nesterov,
            weighting=s.weighting,
            aggregation=aggregation,
        )
    if s.name == "fedavg":
        return DiLoCo.fedavg(
            params,
            inner_steps=cfg.train.inner_steps,
            weighting=s.weighting,
            aggregation=aggregation,
        )
    if s.name == "streaming":
        from fedtrain.models.presets import PRESETS

        return StreamingDiLoCo(
            params,
            n_layers=PRESETS[cfg.model.preset].n_layers,
            inner_steps=cfg.train.inner_steps,
            fragments=s.fragments,
            pattern=s.fragment_pattern,
            delay_steps=s.delay_steps,
            mix_alpha=s.mix_alpha,
            lr=s.outer_lr,
            momentum=s.outer_momentum,
            nesterov=s.nesterov,
            weighting=s.weighting,
            aggregation=aggregation,
        )
    if s.name == "zo":
        from fedtrain.strategies.zo import ZerothOrder

        return ZerothOrder(
            params,
            run_id=run_id,
            samples=s.zo_samples_per_round,
            lr=s.zo_lr,
            eps=s.zo_eps,
            perturbation=s.zo_perturbation,
            trainable=s.zo_trainable,
        )
    if s.name == "ddp":
        return DataParallel(params, train=cfg.train, total_steps=cfg.total_inner_steps())
    raise ValueError(f"unknown strategy {s.name!r}")
