"""Inner optimizer factories and the learning-rate schedule shared by silo training and the DDP
baseline."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fedtrain.config import TrainSection

__all__ = ["OptimizerFactory", "adamw_factory", "lr_at", "make_adamw"]

OptimizerFactory = Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]
"""Builds an inner optimizer over named parameters (the trainer sets each group's ``lr`` every
step from :func:`lr_at`)."""


def lr_at(step: int, cfg: TrainSection, total_steps: int) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.min_lr_ratio * lr`` at the end.

    ``step`` counts inner steps already taken (0 for the first step). The schedule spans the whole
    run (``total_steps``), not one round, as inner state persists across DiLoCo rounds.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_adamw(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and vectors are not decayed)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def adamw_factory(cfg: TrainSection) -> OptimizerFactory:
    """The default inner optimizer: :func:`make_adamw` with ``cfg``'s settings."""

    def build(named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        return make_adamw(named, cfg)

    return build
