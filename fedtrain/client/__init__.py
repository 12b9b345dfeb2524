"""Silo side: the step-driven trainer and its inner optimizer."""

from fedtrain.client.optim import lr_at, make_adamw
from fedtrain.client.trainer import SiloTrainer, StepStats, evaluate_loss

__all__ = ["SiloTrainer", "StepStats", "evaluate_loss", "lr_at", "make_adamw"]
