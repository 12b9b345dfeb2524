"""Silo side: the step-driven trainer, its daemon and the Flower mailbox ClientApp.

Names are imported lazily: the mailbox ClientApp (``fedtrain.client.app``) starts once per
Flower message and must not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["SiloTrainer", "StepStats", "evaluate_loss", "lr_at", "make_adamw"]

_WHERE = {
    "SiloTrainer": "fedtrain.client.trainer",
    "StepStats": "fedtrain.client.trainer",
    "evaluate_loss": "fedtrain.client.trainer",
    "lr_at": "fedtrain.client.optim",
    "make_adamw": "fedtrain.client.optim",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
