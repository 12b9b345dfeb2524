"""Outer algorithms: DiLoCo (and FedAvg as its preset), the data-parallel baseline."""

from __future__ import annotations

import torch

from fedtrain.config import Config
from fedtrain.strategies.base import OuterOptimizerStrategy, Strategy, Work
from fedtrain.strategies.ddp import DataParallel
from fedtrain.strategies.diloco import DiLoCo

__all__ = ["DataParallel", "DiLoCo", "OuterOptimizerStrategy", "Strategy", "Work", "build_strategy"]


def build_strategy(cfg: Config, params: dict[str, torch.nn.Parameter]) -> Strategy:
    """The strategy named by ``cfg.strategy.name`` over the global ``params``."""
    s = cfg.strategy
    if s.name == "diloco":
        return DiLoCo(
            params,
            inner_steps=cfg.train.inner_steps,
            lr=s.outer_lr,
            momentum=s.outer_momentum,
            nesterov=s.nesterov,
            weighting=s.weighting,
        )
    if s.name == "fedavg":
        return DiLoCo.fedavg(params, inner_steps=cfg.train.inner_steps, weighting=s.weighting)
    if s.name == "ddp":
        return DataParallel(params, train=cfg.train, total_steps=cfg.total_inner_steps())
    raise ValueError(f"unknown strategy {s.name!r}")
