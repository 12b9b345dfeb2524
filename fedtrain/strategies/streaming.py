"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication").

The model is split into P fragments: transformer blocks strided (fragment p holds blocks p,
p+P, ...) or contiguous, the token embedding joining the first fragment and the final norm and
output head the last, so P=1 is plain DiLoCo. Fragment p synchronises at inner steps t with
(t − t_p) mod H == 0, t_p = p·H/P: a commit every H/P steps, one fragment in flight at a time,
so peak bandwidth drops by ~P. Each silo sends fragment p's pseudo-gradient θ̃_p − θ_p (against
its copy θ̃ of the last GLOBAL value) and keeps training; the outer result arrives τ steps later
and is merged as θ_p ← α·θ_p,local + (1−α)·θ̃_p. Each fragment has its own outer optimizer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from fedtrain.protocol.work import TrainWork, Work
from fedtrain.strategies.base import (
    AggregationPlugin,
    Strategy,
    optimizer_from_tensors,
    optimizer_to_tensors,
    step_some,
)
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config

__all__ = ["SPEC", "StreamingDiLoCo", "count_layers", "fragment_at_step", "split_fragments"]

_BLOCK = re.compile(r"^layers\.(\d+)\.")


def count_layers(names: list[str]) -> int:
    """Transformer blocks among parameter ``names``: distinct ``layers.<i>.`` indices."""
    return len({m.group(1) for n in names if (m := _BLOCK.match(n))})


def split_fragments(
    names: list[str], n_layers: int, fragments: int, pattern: str = "strided"
) -> list[list[str]]:
    """Parameter names of each fragment (every name in exactly one fragment)."""
    if not 1 <= fragments <= n_layers:
        raise ValueError(
            f"strategy.fragments must be in [1, {n_layers}] (the number of "
            f"transformer blocks), got {fragments}"
        )
    if pattern not in ("strided", "contiguous"):
        raise ValueError(f"fragment pattern must be 'strided' or 'contiguous', got {pattern!r}")
    out: list[list[str]] = [[] for _ in range(fragments)]
    for name in sorted(names):
        m = _BLOCK.match(name)
        if m:
            layer = int(m.group(1))
            p = layer % fragments if pattern == "strided" else layer * fragments // n_layers
        elif name.startswith("tok_emb."):
            p = 0
        else:  # final norm, output head
            p = fragments - 1
        out[p].append(name)
    return out


def fragment_at_step(t: int, inner_steps: int, fragments: int) -> int | None:
    """The fragment that syncs at inner step ``t`` (t ≥ 1), or None."""
    stride = inner_steps // fragments
    if t <= 0 or t % stride:
        return None
    return (t // stride) % fragments


class StreamingDiLoCo(Strategy):
    """Fragment-wise outer Nesterov SGD; one commit per fragment sync."""

    name = "streaming"
    reply_kind = "pseudo_grad"

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        *,
        n_layers: int | None = None,
        inner_steps: int,
        fragments: int,
        pattern: str = "strided",
        delay_steps: int = 1,
        mix_alpha: float = 0.5,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        weighting: str = "tokens",
        aggregation: AggregationPlugin | None = None,
    ) -> None:
        super().__init__(params)
        if inner_steps % fragments:
            raise ValueError(
                f"inner steps H={inner_steps} must be divisible by P={fragments} fragments"
            )
        if not 0 <= delay_steps < inner_steps // fragments:
            raise ValueError(
                f"delay τ={delay_steps} must be in [0, H/P={inner_steps // fragments})"
            )
        if not 0.0 <= mix_alpha <= 1.0:
            raise ValueError(f"mix α={mix_alpha} must be in [0, 1]")
        if n_layers is None:  # the model it is given, not a preset table
            n_layers = count_layers(list(params))
        self.fragments = split_fragments(list(params), n_layers, fragments, pattern)
        self.inner_steps = inner_steps
        self.stride = inner_steps // fragments
        self.delay_steps = delay_steps
        self.mix_alpha = mix_alpha
        self.weighting = weighting
        self.aggregation = aggregation
        """Tree, int64 or robust aggregation (None: the flat fp32 streaming mean)."""
        self.optimizers = [
            torch.optim.SGD(
                [params[n] for n in frag],
                lr=lr,
                momentum=momentum,
                nesterov=nesterov and momentum > 0,
            )
            for frag in self.fragments
        ]

    def fragment_of_round(self, round: int) -> int:
        """Round k commits the sync at inner step k·H/P."""
        p = fragment_at_step(round * self.stride, self.inner_steps, len(self.fragments))
        assert p is not None
        return p

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        p = self.fragment_of_round(round)
        # The previous round's result is applied τ steps into this round's training.
        return {
            s: TrainWork(
                steps=min(self.stride, steps),
                names=self.fragments[p],
                fragment=p,
                apply_at=self.delay_steps if round > 1 else 0,
                alpha=self.mix_alpha,
            )
            for s in silos
        }

    def update_names(self, round: int) -> list[str]:
        return self.fragments[self.fragment_of_round(round)]

    def weight(self, meta: dict[str, Any]) -> float:
        return float(meta.get("tokens", 0)) if self.weighting == "tokens" else 1.0

    def step(self, mean_update: dict[str, torch.Tensor], round: int) -> None:
        p = self.fragment_of_round(round)
        step_some(self.optimizers[p], self.params, mean_update, self.fragments[p])

    def outer_parts(self, round: int) -> list[list[str]]:
        """The round's fragment one parameter at a time (its SGD steps each on its own)."""
        return [[n] for n in sorted(self.update_names(round))]

    def step_part(self, mean_update: dict[str, torch.Tensor], round: int, names: list[str]) -> None:
        step_some(self.optimizers[self.fragment_of_round(round)], self.params, mean_update, names)

    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for opt, frag in zip(self.optimizers, self.fragments, strict=True):
            t, m = optimizer_to_tensors(opt, {n: self.params[n] for n in frag}, copy=copy)
            tensors.update(t)  # parameter names are unique across fragments
            metas.append(m)
        return tensors, {"fragments": metas}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for opt, frag, m in zip(self.optimizers, self.fragments, meta["fragments"], strict=True):
            own = {k: v for k, v in tensors.items() if k.rpartition("::")[0] in set(frag)}
            optimizer_from_tensors(opt, {n: self.params[n] for n in frag}, own, m)


def _check(cfg: Config) -> None:
    """Fragments sync every H/P steps, one at a time: P divides H and τ < H/P."""
    from fedtrain.config.errors import check

    h, p, tau = cfg.train.inner_steps, cfg.strategy.fragments, cfg.strategy.delay_steps
    check(
        h % p == 0,
        "strategy.fragments",
        f"a divisor of train.inner_steps = {h} (fragments sync every H/P steps)",
        p,
    )
    check(
        tau < h // p,
        "strategy.delay_steps",
        f"less than H/P = {h // p} (one fragment in flight at a time)",
        tau,
    )


def _build(
    cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext
) -> StreamingDiLoCo:
    from fedtrain.strategies.diloco import aggregation_for

    s = cfg.strategy
    return StreamingDiLoCo(
        params,
        inner_steps=cfg.train.inner_steps,
        fragments=s.fragments,
        pattern=s.fragment_pattern,
        delay_steps=s.delay_steps,
        mix_alpha=s.mix_alpha,
        lr=s.outer_lr,
        momentum=s.outer_momentum,
        nesterov=s.nesterov,
        weighting=s.weighting,
        aggregation=aggregation_for(cfg, params),
    )


SPEC = StrategySpec(
    name="streaming",
    summary="Streaming DiLoCo (Douillard et al. 2025): fragment-wise syncs overlapping training",
    fields=(
        "fragments",
        "fragment_pattern",
        "delay_steps",
        "mix_alpha",
        "outer_lr",
        "outer_momentum",
        "nesterov",
        "weighting",
        "aggregator",
        "trim_fraction",
        "clip_norm",
    ),
    trees=True,
    robust=True,
    analytic="streaming",
    steps_per_round=lambda cfg: cfg.train.inner_steps // cfg.strategy.fragments,
    check=_check,
    build=_build,
)
"""Streaming DiLoCo."""
