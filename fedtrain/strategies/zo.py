"""Shared-randomness zeroth-order exchange: the math ("Just One Byte", Zelikman et al. 2023;
MeZO, Malladi et al. 2023).

A silo estimates a projected gradient g = (L(θ+εz) − L(θ−εz)) / 2ε along a direction z that
every party can regenerate from a seed, and sends one byte per estimate; seeds are derived from
(run, round, silo, sample), never sent. Every party replays all estimates of a round in the
canonical order (round, silo, sample): θ ← θ − (η/N)·Σ ĝ·z(s). This module is the pure part:
seeds, directions, the one-byte code, SPSA with exact restore, and replay.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedtrain.aggregation.mean import Aggregator
from fedtrain.protocol.work import Work, ZOWork
from fedtrain.strategies.base import Strategy
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config

__all__ = [
    "MAX_RELATIVE_ERROR",
    "SPEC",
    "CodeCollector",
    "ZerothOrder",
    "catch_up",
    "next_scale",
    "ZOEntry",
    "decode_byte",
    "direction",
    "encode_byte",
    "replay",
    "spsa",
    "zo_seed",
]

_MASK = (1 << 64) - 1
# Relative error bound of the one-byte code: half a level of 2^(1/8) in log space.
MAX_RELATIVE_ERROR = 2 ** (1 / 16) - 1  # 4.43%


def zo_seed(run_id: str, round: int, silo: str, sample: int) -> int:
    """63-bit seed: blake2b over the UTF-8 of 'run_id/round/silo/sample', first 8 bytes."""
    text = f"{run_id}/{round}/{silo}/{sample}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _signed(x: int) -> int:
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def _mix_scalar(x: int) -> int:
    """splitmix64 finaliser on a Python int (exact, unsigned 64-bit)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 lanes (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 lanes (two's-complement wrap-around arithmetic)."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _srl(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def direction(
    seed: int, param_index: int, numel: int, kind: str = "rademacher", start: int = 0
) -> torch.Tensor:
    """z for elements [start, start+numel) of parameter ``param_index`` (sorted-name order).

    'rademacher': ±1 from a counter-based hash of (seed, parameter, element index) in integer
    ops — identical on every machine and device, and for any sharding (the element index is the
    index in the UNSHARDED flattened tensor). 'gaussian': normals from a CPU generator (the
    whole tensor is drawn; ``start`` selects the shard).
    """
    if kind == "rademacher":
        base = _mix_scalar(seed ^ _mix_scalar(param_index))
        idx = torch.arange(start, start + numel, dtype=torch.int64) + _signed(base)
        bits = _mix(idx) & 1
        return (1 - 2 * bits).to(torch.float32)
    if kind == "gaussian":
        gen = torch.Generator().manual_seed(_signed(_mix_scalar(seed ^ param_index)) & (2**63 - 1))
        return torch.randn(start + numel, generator=gen)[start:]
    raise ValueError(f"perturbation must be 'rademacher' or 'gaussian', got {kind!r}")


def encode_byte(
    g: torch.Tensor,
    scale: float,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """int8 codes b = sign(g)·clamp(round(8·log2|g/scale|) + 64, 1, 127); 0 means exactly 0."""
    v = g.double() / scale
    level = 8 * torch.log2(v.abs().clamp_min(1e-300)) + 64
    if stochastic:
        # Between the two neighbouring levels with probabilities linear in VALUE (unbiased).
        lo = torch.floor(level)
        lo_v, hi_v = 2 ** ((lo - 64) / 8), 2 ** ((lo + 1 - 64) / 8)
        p_up = (v.abs() - lo_v) / (hi_v - lo_v)
        level = lo + (torch.rand(v.shape, generator=generator, dtype=torch.float64) < p_up)
    else:
        level = torch.round(level)
    code = level.clamp(1, 127) * torch.sign(v)
    return torch.where(v == 0, torch.zeros_like(code), code).to(torch.int8)


def decode_byte(b: torch.Tensor, scale: float) -> torch.Tensor:
    """ĝ = sign(b)·2^((|b|−64)/8)·scale (float64), 0 for b = 0."""
    bf = b.to(torch.float64)
    mag = torch.pow(2.0, (bf.abs() - 64) / 8) * scale
    return torch.where(bf == 0, torch.zeros_like(bf), torch.sign(bf) * mag)


@torch.no_grad()
def spsa(
    params: list[torch.nn.Parameter],
    loss: Callable[[], float],
    seed: int,
    eps: float,
    kind: str = "rademacher",
) -> float:
    """g = (L(θ+εz) − L(θ−εz)) / 2ε, perturbing in place; θ is restored EXACTLY (from a copy),
    so every replica keeps bitwise the same weights."""
    saved = [p.detach().clone() for p in params]
    zs = [direction(seed, i, p.numel(), kind).view_as(p) for i, p in enumerate(params)]
    for p, z in zip(params, zs, strict=True):
        p.add_(z, alpha=eps)
    plus = loss()
    for p, z in zip(params, zs, strict=True):
        p.add_(z, alpha=-2 * eps)
    minus = loss()
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
    return (plus - minus) / (2 * eps)


@dataclass(frozen=True, slots=True)
class ZOEntry:
    round: int
    silo: str
    sample: int
    code: int
    """The one-byte code as sent."""


@torch.no_grad()
def replay(
    params: list[torch.nn.Parameter],
    entries: Iterable[ZOEntry],
    *,
    run_id: str,
    lr: float,
    scale: float,
    kind: str = "rademacher",
) -> None:
    """θ ← θ − (η/N)·Σ ĝ·z(s) over one round's entries in canonical (round, silo, sample) order.

    Every party calls this with the same log and ends with bitwise the same θ.
    """
    ordered = sorted(entries, key=lambda e: (e.round, e.silo, e.sample))
    if not ordered:
        return
    n = len(ordered)
    for e in ordered:
        g = float(decode_byte(torch.tensor([e.code], dtype=torch.int8), scale)[0])
        if g == 0.0 or not math.isfinite(g):
            continue
        seed = zo_seed(run_id, e.round, e.silo, e.sample)
        for i, p in enumerate(params):
            p.add_(direction(seed, i, p.numel(), kind).view_as(p), alpha=-lr * g / n)


class CodeCollector(Aggregator):
    """Aggregation for ZO rounds: keep each silo's codes (K bytes), not a mean."""

    def __init__(self) -> None:
        self.codes: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.codes[sender] = tensors["codes"].detach().clone()
        self.total_weight += weight
        self.count += 1

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() for t in self.codes.values())

    def mean(self) -> dict[str, torch.Tensor] | None:
        return dict(self.codes) if self.codes else None


class ZerothOrder(Strategy):
    """One-byte projected gradients per silo and sample; every party replays the round."""

    name = "zo"
    reply_kind = "zo_codes"
    broadcast_codec = "code8"

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        *,
        run_id: str,
        samples: int,
        lr: float,
        eps: float,
        perturbation: str = "rademacher",
        trainable: str = "",
    ) -> None:
        super().__init__(params)
        names = sorted(n for n in params if not trainable or fnmatch.fnmatch(n, trainable))
        if not names:
            raise ValueError(f"strategy.zo_trainable {trainable!r} matches no parameter")
        self.names = names
        self.run_id = run_id
        self.samples = samples
        self.lr = lr
        self.eps = eps
        self.perturbation = perturbation
        self.scale = 1.0
        self._round_scale = 1.0

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        return {
            s: ZOWork(
                steps=self.samples,
                names=["codes"],
                eps=self.eps,
                scale=self.scale,
                perturbation=self.perturbation,
                perturbed=list(self.names),
            )
            for s in silos
        }

    def new_aggregator(self) -> CodeCollector:
        return CodeCollector()

    def weight(self, meta: dict[str, Any]) -> float:
        return 1.0

    def entries(self, round: int, codes: dict[str, torch.Tensor]) -> list[ZOEntry]:
        return [
            ZOEntry(round=round, silo=s, sample=k, code=int(c))
            for s, t in codes.items()
            for k, c in enumerate(t.tolist())
        ]

    def step(self, mean_update: dict[str, torch.Tensor], round: int) -> None:
        self._round_scale = self.scale
        entries = self.entries(round, mean_update)
        replay(
            [self.params[n] for n in self.names],
            entries,
            run_id=self.run_id,
            lr=self.lr,
            scale=self.scale,
            kind=self.perturbation,
        )
        self.scale = next_scale([e.code for e in entries], self.scale)

    def broadcast(self, round: int) -> dict[str, Any]:
        """Metadata silos need to replay this round (scale used, lr, perturbation, names)."""
        return {
            "zo_lr": self.lr,
            "zo_scale": self._round_scale,
            "zo_perturbation": self.perturbation,
            "zo_names": self.names,
        }

    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"scale": self.scale}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.scale = float(meta["scale"])


def next_scale(codes: Iterable[int], scale: float) -> float:
    """The next round's code scale: median decoded magnitude of this round's codes (every
    party has them, so every party computes the same value); unchanged if all are zero."""
    mags = decode_byte(torch.tensor(list(codes), dtype=torch.int8), scale).abs()
    mags = mags[mags > 0]
    return float(mags.median()) if mags.numel() else scale


@torch.no_grad()
def catch_up(
    params: list[torch.nn.Parameter],
    rounds: Iterable[dict[str, torch.Tensor]],
    *,
    first_round: int,
    run_id: str,
    lr: float,
    scale: float = 1.0,
    kind: str = "rademacher",
) -> float:
    """Bring a replica forward by replaying logged rounds (each: silo -> its codes), starting at
    ``first_round`` with that round's ``scale``; returns the scale for the round after."""
    for offset, codes in enumerate(rounds):
        rnd = first_round + offset
        entries = [
            ZOEntry(round=rnd, silo=s, sample=k, code=int(c))
            for s, t in codes.items()
            for k, c in enumerate(t.tolist())
        ]
        replay(params, entries, run_id=run_id, lr=lr, scale=scale, kind=kind)
        scale = next_scale([e.code for e in entries], scale)
    return scale


def _build(cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext) -> ZerothOrder:
    s = cfg.strategy
    return ZerothOrder(
        params,
        run_id=ctx.run_id,
        samples=s.zo_samples_per_round,
        lr=s.zo_lr,
        eps=s.zo_eps,
        perturbation=s.zo_perturbation,
        trainable=s.zo_trainable,
    )


_ONE_BYTE = "its replies are one-byte projected gradients replayed by every party, not a mean"
SPEC = StrategySpec(
    name="zo",
    summary="Zeroth-order SPSA (MeZO-style): K one-byte projected gradients per silo and round",
    fields=("zo_samples_per_round", "zo_eps", "zo_lr", "zo_perturbation", "zo_trainable"),
    # The silo daemon runs only 'train' work: zo work is not available in deployment yet.
    engines=frozenset({"inprocess"}),
    reasons={"trees": _ONE_BYTE, "robust": _ONE_BYTE},
    steps_per_round=lambda cfg: cfg.strategy.zo_samples_per_round,
    build=_build,
)
"""Zeroth-order training."""
