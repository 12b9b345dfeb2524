"""Gradient-coded DiLoCo rounds: a slow or dead silo no longer sets the pace (ALGORITHMS §5).

The coordinator splits the public training corpus into n shards (shard j = the public share the
uncoded run gives silo j) and assigns them with a gradient code B so each silo holds s+1. A
silo trains each of its shards from the same global start θ^(t−1) with a fresh inner optimizer
and a data order fixed by (round, shard), and returns y_i = Σ_j B_ij·g_j. The round closes as
soon as the arrived set F decodes (B_Fᵀa = 1): Σ_{i∈F} a_i·y_i = Σ_j g_j, the same sum whoever
straggled; the outer step then uses the mean (1/n)·Σ_j g_j. Replication is only of public
shards: silos with private data are never given coded work (the config refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedtrain.aggregation.mean import Aggregator
from fedtrain.protocol.work import CodedWork, Work
from fedtrain.strategies.diloco import DiLoCo
from fedtrain.strategies.gradient_coding import Decoding, choose_construction, decode
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config

__all__ = ["SPEC", "CodedDiLoCo", "CodedSum"]


class CodedSum(Aggregator):
    """Holds the coded replies of one round until they decode; then Σ a_i·y_i / n.

    Decoding coefficients depend on which silos arrived, so replies are kept (at most the
    arrivals before the set became decodable, n−s of them when nobody is late) — unlike the
    streaming mean, this buffer grows with the silo count.
    """

    def __init__(self, b: np.ndarray, silos: list[str], shard_tokens: int) -> None:
        self.b = b
        self.index = {s: i for i, s in enumerate(silos)}
        self.shard_tokens = shard_tokens
        self._replies: dict[str, dict[str, torch.Tensor]] = {}
        self.decoding: Decoding | None = None

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if sender not in self.index:
            raise ValueError(f"coded reply from unknown silo {sender!r}")
        self._replies[sender] = {n: t.detach().double() for n, t in tensors.items()}

    def _decode(self) -> Decoding:
        return decode(self.b, [self.index[s] for s in self._replies])

    def done(self) -> bool:
        """The arrivals decode exactly: the round can close now."""
        return bool(self._replies) and self._decode().exact

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * 4 for r in self._replies.values() for t in r.values())

    def tokens(self, counted: int) -> int:
        """Tokens the decoded update stands for: every shard's, once."""
        return self.b.shape[0] * self.shard_tokens if self._replies else 0

    def mean(self) -> dict[str, torch.Tensor] | None:
        """(1/n)·Σ_{i∈F} a_i·y_i: the mean shard pseudo-gradient (approximate when F does not
        decode; :attr:`decoding` says how far off, ε_F)."""
        if not self._replies:
            return None
        self.decoding = dec = self._decode()
        n = self.b.shape[0]
        out: dict[str, torch.Tensor] = {}
        for silo, tensors in self._replies.items():
            a = float(dec.a[self.index[silo]])
            if a == 0.0:
                continue
            for name, t in tensors.items():
                if name in out:
                    out[name].add_(t, alpha=a)
                else:
                    out[name] = t * a
        if not out:  # every arrival got a zero coefficient
            first = next(iter(self._replies.values()))
            out = {name: torch.zeros_like(t) for name, t in first.items()}
        return {name: (t / n).float() for name, t in out.items()}

    def report(self) -> dict[str, Any]:
        """Decode facts for the round's record."""
        if self.decoding is None:
            return {}
        return {
            "decode_exact": self.decoding.exact,
            "decode_error": self.decoding.error,
            "decoded_from": sorted(self._replies, key=self.index.__getitem__),
        }


class CodedDiLoCo(DiLoCo):
    """DiLoCo whose rounds are gradient-coded over n public shards (Tandon et al. 2017)."""

    name = "diloco-coded"

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        *,
        silos: int,
        stragglers: int,
        coding: str,
        inner_steps: int,
        tokens_per_step: int,
        **outer: Any,
    ) -> None:
        # Shards are equal-sized units of work: their mean is an equally weighted one.
        super().__init__(params, inner_steps=inner_steps, weighting="equal", **outer)
        self.construction, self.stragglers, self.b = choose_construction(silos, stragglers, coding)
        self.tokens_per_step = tokens_per_step
        self._steps = inner_steps
        self._silos: list[str] = []

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        if len(silos) != self.b.shape[0]:
            raise ValueError(f"the code is for {self.b.shape[0]} silos, got {len(silos)}")
        self._silos = list(silos)
        self._steps = h = min(self.inner_steps, steps)
        work: dict[str, Work] = {}
        for i, silo in enumerate(silos):
            shards = [int(j) for j in np.flatnonzero(self.b[i])]
            work[silo] = CodedWork(
                steps=h,
                shards=shards,
                coeffs=[float(self.b[i, j]) for j in shards],
                # The data order and LR schedule position of every replica of a shard.
                step0=(round - 1) * self.inner_steps,
            )
        return work

    def new_aggregator(self) -> CodedSum:
        return CodedSum(self.b, self._silos, self._steps * self.tokens_per_step)


CODABLE = ("diloco", "fedavg")
"""``strategy.name`` values whose rounds can be gradient-coded."""


def _check(cfg: Config) -> None:
    from fedtrain.config.errors import check

    st = cfg.strategy
    check(
        st.name in CODABLE,
        "strategy.coding",
        f"'off' with strategy.name = {st.name!r} (coded rounds are DiLoCo/FedAvg rounds)",
        st.coding,
    )
    check(
        st.stragglers < cfg.data.silos,
        "strategy.stragglers",
        f"less than data.silos = {cfg.data.silos}",
        st.stragglers,
    )
    check(
        st.scheduling == "sync",
        "strategy.scheduling",
        "'sync' with gradient coding (a coded round needs every shard from one start)",
        st.scheduling,
    )


def _build(cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext) -> CodedDiLoCo:
    from fedtrain.strategies.diloco import outer_settings

    s = cfg.strategy
    return CodedDiLoCo(
        params,
        silos=cfg.data.silos,
        stragglers=s.stragglers,
        coding=s.coding,
        inner_steps=cfg.train.inner_steps,
        tokens_per_step=cfg.train.tokens_per_step,
        **outer_settings(s),
    )


SPEC = StrategySpec(
    name="coded",
    summary="Gradient-coded DiLoCo rounds (Tandon et al. 2017) over replicated public shards",
    selected_by="coding",
    fields=("coding", "stragglers", "outer_lr", "outer_momentum", "nesterov"),
    # Coded work needs every silo to hold the public shards; deployed rounds are uncoded.
    engines=frozenset({"inprocess"}),
    error_feedback=False,
    private_data=False,
    replicated_shards=True,
    reasons={
        "error_feedback": "the decode coefficients would mix each silo's residual into the sum",
        "private_data": "coding replicates shards across silos, and private data is never "
        "replicated",
        "trees": "the gradient-code decode needs each reply with its own coefficient, known "
        "only when the round closes",
        "robust": "gradient-code decode",
    },
    steps_per_round=lambda cfg: cfg.train.inner_steps,
    check=_check,
    build=_build,
)
"""Coded rounds (``strategy.coding != 'off'``)."""
