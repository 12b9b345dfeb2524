"""Synchronous data-parallel baseline: one step per round, average the gradients, repeat.

Every round each silo computes one step's gradient at the global weights; the coordinator
averages them and takes the AdamW step the silos would have taken (same schedule, same
hyper-parameters), then broadcasts the update. Its bytes are what data-parallel training costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedtrain.config import TrainSection
from fedtrain.optim import lr_at, make_adamw
from fedtrain.protocol.work import GradWork, Work
from fedtrain.strategies.base import OuterOptimizerStrategy
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config

__all__ = ["SPEC", "DataParallel"]


class DataParallel(OuterOptimizerStrategy):
    """AdamW on the token-weighted mean gradient of all silos, one inner step per round."""

    name = "ddp"
    reply_kind = "grad"

    def __init__(
        self, params: dict[str, torch.nn.Parameter], *, train: TrainSection, total_steps: int
    ) -> None:
        super().__init__(params)
        self.train_cfg = train
        self.total_steps = total_steps
        self.optimizer = make_adamw(list(params.items()), train)
        self.steps_taken = 0

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        return {s: GradWork(steps=1) for s in silos}

    def weight(self, meta: dict[str, Any]) -> float:
        return float(meta.get("tokens", 0))

    def step(self, mean_update: dict[str, torch.Tensor], round: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.steps_taken, self.train_cfg, self.total_steps)
        self._apply_grads(mean_update, clip=self.train_cfg.grad_clip)
        self.steps_taken += 1

    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_tensors(copy)
        meta["steps_taken"] = self.steps_taken
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_tensors(tensors, meta)
        self.steps_taken = int(meta["steps_taken"])


def _build(cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext) -> DataParallel:
    return DataParallel(params, train=cfg.train, total_steps=cfg.total_inner_steps())


_GRADIENTS = "one step's gradients feed AdamW at the coordinator, not a weighted mean of updates"
SPEC = StrategySpec(
    name="ddp",
    summary="Data-parallel baseline: AdamW on the mean gradient of all silos, one step a round",
    # The silo daemon runs only 'train' work: 'grad' work is not available in deployment yet.
    engines=frozenset({"inprocess"}),
    reasons={"trees": _GRADIENTS, "robust": _GRADIENTS},
    analytic="ddp",
    steps_per_round=lambda cfg: 1,
    build=_build,
)
"""The data-parallel baseline."""
