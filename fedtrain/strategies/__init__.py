"""Outer algorithms, one module each, each declaring its :class:`StrategySpec` in the registry:
DiLoCo (FedAvg as its preset), Streaming DiLoCo, zeroth-order, coded and Compass-scheduled
DiLoCo rounds, the data-parallel baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedtrain.config import Config
from fedtrain.strategies.base import OuterOptimizerStrategy, Strategy
from fedtrain.strategies.ddp import DataParallel
from fedtrain.strategies.diloco import DiLoCo
from fedtrain.strategies.registry import BuildContext, StrategySpec, spec_for, strategy_specs
from fedtrain.strategies.streaming import StreamingDiLoCo

__all__ = [
    "BuildContext",
    "DataParallel",
    "DiLoCo",
    "OuterOptimizerStrategy",
    "Strategy",
    "StrategySpec",
    "StreamingDiLoCo",
    "build_strategy",
    "spec_for",
    "strategy_specs",
]


def build_strategy(
    cfg: Config,
    params: dict[str, torch.nn.Parameter],
    *,
    run_id: str = "",
    clock: Callable[[], float | None] | None = None,
) -> Strategy:
    """The strategy ``cfg`` selects (see :func:`spec_for`) over the global ``params``; ``clock``
    is the engine's (seconds now, None: real time) for strategies that schedule by time."""
    return spec_for(cfg).build(cfg, params, BuildContext(run_id=run_id, clock=clock))
