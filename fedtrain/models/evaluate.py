"""Held-out evaluation of a model: mean next-token loss on token windows."""

from __future__ import annotations

import contextlib

import torch

from fedtrain.models.llama import Llama

__all__ = ["evaluate_loss"]


@torch.no_grad()
def evaluate_loss(
    model: Llama, windows: torch.Tensor, batch_size: int, bf16: bool = False
) -> float:
    """Mean next-token cross-entropy of ``model`` on ``(N, T+1)`` token windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size]
        with ctx:
            loss = model.loss(chunk[:, :-1], chunk[:, 1:])
        total += float(loss) * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / count
