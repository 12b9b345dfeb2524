"""Inner optimizer and learning-rate schedule shared by silo training and the DDP baseline."""

from __future__ import annotations

import math

import torch

from fedtrain.config import TrainSection

__all__ = ["lr_at", "make_adamw"]


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
