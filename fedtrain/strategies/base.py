"""The outer-algorithm interface: plan a round's work, weight replies, take the outer step.

Strategies are pure with respect to I/O: they see decoded tensors and metadata and own the global
parameters and the outer optimizer. The same object runs under every engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch

from fedtrain.protocol.work import Work

__all__ = [
    "OuterOptimizerStrategy",
    "Strategy",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "step_some",
]


class AggregationPlugin(Protocol):
    """Makes each round's aggregator and owns what they share (e.g. processes)."""

    def new_aggregator(self) -> Any: ...

    def close(self) -> None: ...


class Strategy(ABC):
    """Outer algorithm over global parameters ``params`` (owned, updated in place)."""

    name: str
    reply_kind: str

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params

    @abstractmethod
    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        """Work for each silo this round; ``steps`` is the remaining inner-step allowance."""

    broadcast_codec: str | None = None
    """When set, the round's broadcast is the collected replies in this codec (not θ's update);
    every party applies them itself (see :meth:`broadcast`)."""

    aggregation: AggregationPlugin | None = None
    """Tree or int64 aggregation (fedtrain.aggregation.tree) or a robust aggregator
    (fedtrain.aggregation.robust); None: the flat fp32 streaming mean."""

    def new_aggregator(self) -> Any:
        """How replies are combined; default: the configured aggregation, else the streaming
        weighted mean."""
        if self.aggregation is not None:
            return self.aggregation.new_aggregator()
        from fedtrain.aggregation.mean import StreamingMean

        return StreamingMean()

    def close(self) -> None:
        """Release what the strategy started (e.g. aggregator processes); called once the run
        ends, also on failure."""
        if self.aggregation is not None:
            self.aggregation.close()

    async_replies = False
    """True when silos may still be computing when a round closes, their replies counting in a
    later round (semi-asynchronous scheduling); False: unreturned work is discarded."""

    def received(self, silo: str, at: float, ok: bool) -> None:
        """A reply (``ok``) or failure from ``silo`` arrived at time ``at`` (engine clock)."""
        return None  # synchronous strategies keep no per-silo schedule

    def broadcast(self, round: int) -> dict[str, Any]:
        """Metadata for a ``broadcast_codec`` broadcast."""
        return {}

    def update_names(self, round: int) -> list[str] | None:
        """Parameters the outer step of ``round`` changes (None = all): only they are broadcast."""
        return None

    @abstractmethod
    def weight(self, meta: dict[str, Any]) -> float:
        """Aggregation weight of a reply from its metadata."""

    @abstractmethod
    def step(self, mean_update: dict[str, torch.Tensor], round: int) -> None:
        """Apply the weighted-mean reply to ``params`` (in place)."""

    def outer_parts(self, round: int) -> list[list[str]]:
        """The parameters the outer step of ``round`` changes, in groups (in name order) that
        :meth:`step_part` steps one after another with the same result as one :meth:`step`;
        the coordinator then holds one group's old values at a time, not the model's. Default:
        one group, the whole step."""
        return [sorted(self.update_names(round) or self.params)]

    def step_part(self, mean_update: dict[str, torch.Tensor], round: int, names: list[str]) -> None:
        """Step the parameters ``names`` (one of :meth:`outer_parts`); default: :meth:`step`."""
        self.step(mean_update, round)

    @abstractmethod
    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Outer state as tensors + JSON metadata (for checkpoints); ``copy=False`` may give
        the live state tensors (the caller writes them out at once and keeps nothing)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` returned."""


def _ordered_names(opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """Parameter names in the optimizer's own index order (groups concatenated)."""
    by_id = {id(p): n for n, p in params.items()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def step_some(
    opt: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    mean_update: dict[str, torch.Tensor],
    names: list[str],
) -> None:
    """One optimizer step of ``names`` alone (the others have no gradient, so the optimizer
    skips them). For optimizers that update each parameter from its own gradient and state
    (SGD, Adam without clipping), stepping the parameters in parts gives the same bits as one
    step of all of them."""
    for n in names:
        params[n].grad = mean_update[n].to(params[n].dtype).clone()
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer_to_tensors(
    opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state to ``{"<param>::<key>": tensor}`` plus JSON metadata
    (``copy=False``: the state's own tensors, for a caller that only reads them at once)."""
    names = _ordered_names(opt, params)
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
                tensors[f"{names[idx]}::{key}"] = value.clone().contiguous() if copy else value
            else:
                scalars[f"{names[idx]}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    index = {n: i for i, n in enumerate(_ordered_names(opt, params))}
    state: dict[int, dict[str, Any]] = {}
    for full, value in list(tensors.items()) + list(meta["scalars"].items()):
        pname, _, key = full.rpartition("::")
        if pname not in index:
            raise KeyError(f"optimizer state names unknown parameter {pname!r}")
        state.setdefault(index[pname], {})[key] = value
    sd = opt.state_dict()
    groups = []
    for g, saved in zip(sd["param_groups"], meta["param_groups"], strict=True):
        groups.append({**saved, "params": g["params"]})
    opt.load_state_dict({"state": state, "param_groups": groups})


class OuterOptimizerStrategy(Strategy):
    """A strategy whose outer step is an ordinary ``torch.optim`` step on ``p.grad = update``."""

    optimizer: torch.optim.Optimizer

    def _apply_grads(self, mean_update: dict[str, torch.Tensor], clip: float = 0.0) -> None:
        if clip <= 0:
            step_some(self.optimizer, self.params, mean_update, list(self.params))
            return
        for n, p in self.params.items():
            p.grad = mean_update[n].to(p.dtype).clone()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return optimizer_to_tensors(self.optimizer, self.params, copy=copy)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        optimizer_from_tensors(self.optimizer, self.params, tensors, meta)
