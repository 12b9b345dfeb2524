"""The silo trainer: a long-lived, step-driven owner of model, inner optimizer and data stream.

It is driven from outside, a few steps at a time, so one interface serves every outer algorithm:
- DiLoCo: ``train(H)``, then ``pseudo_gradient()``, then ``apply_global_update(delta)``;
- Streaming DiLoCo: ``pseudo_gradient(names)`` for one fragment, keep calling ``train``, and
  ``apply_global_update(delta, names, alpha)`` τ steps later (the anchor θ̃ is per parameter);
- FedCompass: a different ``steps`` per silo per round;
- gradient coding: ``fresh_copy()`` trains a shard from the global start with a fresh optimizer;
- zeroth-order: ``loss_on(batch)`` is a forward-only evaluation at the current weights;
- the DDP baseline: ``gradient()`` computes one step's gradient without updating.
Inner optimizer state and the step counter persist across rounds, as in DiLoCo.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedtrain.config import TrainSection
from fedtrain.data.stream import TokenStream
from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama
from fedtrain.optim import OptimizerFactory, inner_optimizer_factory, lr_at
from fedtrain.strategies.base import optimizer_from_tensors, optimizer_to_tensors

__all__ = ["SiloTrainer", "StepStats"]


@dataclass(slots=True)
class StepStats:
    steps: int
    """Inner steps taken in this call."""
    tokens: int
    """Training tokens processed in this call."""
    mean_loss: float
    """Mean training loss over those steps."""

    def merged(self, later: StepStats) -> StepStats:
        """Stats of this call followed by ``later``."""
        steps = self.steps + later.steps
        loss = (self.mean_loss * self.steps + later.mean_loss * later.steps) / max(steps, 1)
        return StepStats(steps=steps, tokens=self.tokens + later.tokens, mean_loss=loss)


class SiloTrainer:
    """Local training on one silo (Douillard et al. 2023's inner loop)."""

    def __init__(
        self,
        name: str,
        model: Llama,
        stream: TokenStream,
        cfg: TrainSection,
        total_steps: int,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        """``optimizer`` builds the inner optimizer from the named parameters (default: AdamW
        from ``cfg``, :func:`~fedtrain.optim.make_adamw`); its ``lr`` is set every step from
        the schedule (:func:`~fedtrain.optim.lr_at`)."""
        self.name = name
        self.model = model
        self.stream = stream
        self.cfg = cfg
        self.total_steps = total_steps
        self.params = dict(model.named_parameters())
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.make_optimizer = optimizer or inner_optimizer_factory(cfg)
        self.optimizer = self.make_optimizer(list(self.params.items()))
        self.step = 0

    # ----------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.cfg.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self) -> float:
        total = 0.0
        for micro in range(self.cfg.grad_accum):
            x, y = self.stream.batch(self.step, micro, self.cfg.batch_size, self.cfg.seq_len)
            with self._autocast():
                loss = self.model.loss(x, y)
            (loss / self.cfg.grad_accum).backward()
            total += float(loss.detach())
        return total / self.cfg.grad_accum

    def train(self, steps: int, on_step: Callable[[int], None] | None = None) -> StepStats:
        """Run ``steps`` inner optimizer steps on this silo's data."""
        self.model.train()
        losses = []
        for _ in range(steps):
            lr = lr_at(self.step, self.cfg, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(self._forward_backward())
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            if on_step is not None:
                on_step(1)
        mean = sum(losses) / len(losses) if losses else float("nan")
        return StepStats(steps=steps, tokens=steps * self.cfg.tokens_per_step, mean_loss=mean)

    def gradient(self) -> tuple[dict[str, torch.Tensor], StepStats]:
        """Gradient of one step's batch at the current weights, without updating them."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = self._forward_backward()
        grads = {
            n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in self.params.items()
        }
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        return grads, StepStats(steps=1, tokens=self.cfg.tokens_per_step, mean_loss=loss)

    @torch.no_grad()
    def loss_on(self, windows: torch.Tensor, batch_size: int | None = None) -> float:
        """Mean next-token loss on ``windows`` (``(N, T+1)`` tokens), forward only."""
        return evaluate_loss(
            self.model, windows, batch_size or self.cfg.batch_size, bf16=self.cfg.bf16
        )

    # ------------------------------------------------------------ synchronisation
    def pseudo_gradient(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Δ = θ̃ − θ_local (last global value minus local weights) for ``names`` (default all)."""
        keys = list(names) if names is not None else list(self.params)
        return {n: self.anchor[n] - self.params[n].detach() for n in keys}

    @torch.no_grad()
    def apply_global_update(
        self,
        delta: dict[str, torch.Tensor],
        names: Iterable[str] | None = None,
        alpha: float = 0.0,
    ) -> None:
        """θ̃ ← θ̃ + δ̂, then θ_local ← α·θ_local + (1−α)·θ̃ for the updated parameters."""
        keys = list(names) if names is not None else list(delta)
        for n in keys:
            self.anchor[n].add_(delta[n])
            if alpha == 0.0:
                self.params[n].copy_(self.anchor[n])
            elif alpha != 1.0:
                self.params[n].mul_(alpha).add_(self.anchor[n], alpha=1.0 - alpha)

    @torch.no_grad()
    def set_global(self, weights: dict[str, torch.Tensor]) -> None:
        """Load full global weights (join or resync): anchor and local weights both."""
        missing = set(self.params) - set(weights)
        if missing:
            raise KeyError(f"global weights lack parameters: {sorted(missing)[:5]}")
        for n, p in self.params.items():
            self.anchor[n].copy_(weights[n])
            p.copy_(weights[n])

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue bitwise: local and anchor weights, optimizer state, step.

        The data position is the step counter (batches are a pure function of it).
        """
        opt, opt_meta = optimizer_to_tensors(self.optimizer, self.params)
        tensors = {f"local.{n}": p.detach() for n, p in self.params.items()}
        tensors.update({f"anchor.{n}": a for n, a in self.anchor.items()})
        tensors.update({f"opt.{k}": v for k, v in opt.items()})
        return tensors, {"step": self.step, "opt": opt_meta}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for n, p in self.params.items():
            p.copy_(tensors[f"local.{n}"])
            self.anchor[n].copy_(tensors[f"anchor.{n}"])
        opt = {k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")}
        optimizer_from_tensors(self.optimizer, self.params, opt, meta["opt"])
        self.step = int(meta["step"])

    def fresh_copy(self, stream: TokenStream | None = None, step: int | None = None) -> SiloTrainer:
        """A trainer at the global start θ̃ with a fresh inner optimizer (coded shard work),
        reading ``stream`` (default: this silo's) from position ``step`` (default: its own)."""
        clone = SiloTrainer(
            self.name,
            copy.deepcopy(self.model),
            stream or self.stream,
            self.cfg,
            self.total_steps,
            optimizer=self.make_optimizer,
        )
        clone.set_global(self.anchor)
        clone.step = self.step if step is None else step
        return clone
