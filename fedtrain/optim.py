"""Inner optimizer factories and the learning-rate schedule shared by silo training and the DDP
baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fedtrain.config import TrainSection

__all__ = [
    "MuonAdamW",
    "OptimizerFactory",
    "adamw_factory",
    "inner_optimizer_factory",
    "lr_at",
    "make_adamw",
]

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


MUON_EXCLUDED = ("tok_emb.weight", "head.weight")
"""2-D weights that stay on AdamW with Muon (embeddings and the output head, as MuLoCo)."""


class MuonAdamW(torch.optim.Optimizer):
    """Muon (``torch.optim.Muon``: momentum orthogonalised by Newton-Schulz) on the hidden 2-D
    weight matrices, AdamW on embeddings, norms and the head — the MuLoCo recipe (2025).

    One optimizer to the trainer: ``param_groups`` are Muon's then AdamW's (the same dicts, so
    the schedule's lr reaches both), and ``state_dict`` numbers the parameters across both in
    that order, so checkpoints and resume work as for AdamW. Muon's lr is adjusted to match
    AdamW's update RMS (``adjust_lr_fn="match_rms_adamw"``), so ``train.lr`` means the same.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], cfg: TrainSection) -> None:
        matrices = [p for n, p in named if p.ndim == 2 and n not in MUON_EXCLUDED]
        rest = [(n, p) for n, p in named if not (p.ndim == 2 and n not in MUON_EXCLUDED)]
        if not matrices:
            raise ValueError("train.optimizer = 'muon' needs 2-D weight matrices to act on")
        self.muon = torch.optim.Muon(
            matrices,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = make_adamw(rest, cfg)
        self._parts = (self.muon, self.adamw)
        self.defaults = {}
        self.state = {}  # type: ignore[assignment]
        self._optimizer_step_pre_hooks = {}  # type: ignore[assignment]
        self._optimizer_step_post_hooks = {}  # type: ignore[assignment]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for part in self._parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self._parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self._parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for part in self._parts:
            sd = part.state_dict()
            state.update({offset + i: st for i, st in sd["state"].items()})
            for g in sd["param_groups"]:
                groups.append({**g, "params": [offset + i for i in g["params"]]})
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = list(state_dict["param_groups"])
        offset = 0
        for part in self._parts:
            mine = groups[: len(part.param_groups)]
            groups = groups[len(part.param_groups) :]
            count = sum(len(g["params"]) for g in part.param_groups)
            part.load_state_dict(
                {
                    "state": {
                        int(i) - offset: st
                        for i, st in state_dict["state"].items()
                        if offset <= int(i) < offset + count
                    },
                    "param_groups": [
                        {**g, "params": [i - offset for i in g["params"]]} for g in mine
                    ],
                }
            )
            offset += count


def inner_optimizer_factory(cfg: TrainSection) -> OptimizerFactory:
    """The inner optimizer ``train.optimizer`` names: AdamW, or Muon + AdamW."""
    if cfg.optimizer == "adamw":
        return adamw_factory(cfg)

    def build(named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        return MuonAdamW(named, cfg)

    return build
