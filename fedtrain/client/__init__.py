"""Silo side: the step-driven trainer, its daemon and the Flower mailbox ClientApp.

Names are imported lazily: the mailbox ClientApp (``fedtrain.client.app``) starts once per
Flower message and must not pay for importing torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

__all__ = ["SiloTrainer", "StepStats"]

_WHERE = {
    "SiloTrainer": "fedtrain.client.trainer",
    "StepStats": "fedtrain.client.trainer",
}


__getattr__ = lazy(__name__, _WHERE)
