"""Section ``[strategy]``: the outer algorithm and its settings.

Which strategy a config selects and what it can be combined with is declared by the strategy
itself (:mod:`fedtrain.strategies.registry`); the cross-section rules live in
:mod:`fedtrain.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrain.config.errors import check as _check

__all__ = ["StrategySection"]


@dataclass(kw_only=True, slots=True)
class StrategySection:
    name: str = "diloco"
    """'diloco', 'fedavg' (outer SGD lr 1, no momentum), 'streaming' or 'ddp' (baseline)."""
    outer_lr: float = 0.7
    """Outer optimizer learning rate (DiLoCo; ignored by the fedavg preset)."""
    outer_momentum: float = 0.9
    """Outer optimizer momentum (DiLoCo; ignored by the fedavg preset)."""
    nesterov: bool = True
    """Use Nesterov momentum in the outer step."""
    weighting: str = "tokens"
    """Weight of each silo's pseudo-gradient: 'tokens' (tokens processed) or 'equal'."""
    fragments: int = 4
    """Streaming: P, the number of fragments (at most the number of layers; 1 = DiLoCo)."""
    fragment_pattern: str = "strided"
    """Streaming: 'strided' (fragment p holds blocks p, p+P, ...) or 'contiguous'."""
    delay_steps: int = 1
    """Streaming: τ, inner steps a fragment's outer result may arrive late (overlap); < H/P."""
    mix_alpha: float = 0.5
    """Streaming: α, the merge θ_p ← α·θ_local + (1−α)·θ_global (0 = take the global)."""
    zo_samples_per_round: int = 8
    """ZO: K, projected gradients (one byte each) per silo per round."""
    zo_eps: float = 1e-3
    """ZO: ε, the SPSA perturbation size."""
    zo_lr: float = 1e-3
    """ZO: η in θ ← θ − (η/N)·Σ ĝ·z."""
    zo_perturbation: str = "rademacher"
    """ZO: z distribution, 'rademacher' (device independent) or 'gaussian' (CPU generator)."""
    zo_trainable: str = ""
    """ZO: glob of parameter names to tune (e.g. 'tok_emb.*'); empty = all."""
    aggregator: str = "mean"
    """How a round's updates combine: 'mean' (weighted, streaming), 'median' (coordinate-wise),
    'trimmed_mean' (coordinate-wise, drops trim_fraction at each end) or 'clipped_mean' (each
    update's L2 norm clipped to clip_norm, then the weighted mean)."""
    trim_fraction: float = 0.1
    """trimmed_mean: β, the fraction of updates dropped at each end per coordinate (< 0.5)."""
    clip_norm: float = 1.0
    """clipped_mean: largest L2 norm an update keeps (over all its tensors)."""
    coding: str = "off"
    """Gradient-code DiLoCo rounds over public shards: 'off', 'auto', 'frc', 'cyclic', 'random'."""
    stragglers: int = 0
    """Gradient coding: s, the stragglers a coded round tolerates (each silo trains s+1 shards)."""
    scheduling: str = "sync"
    """'sync' (every silo runs H steps per round) or 'compass' (per-silo steps, arrival groups)."""
    q_min: int = 20
    """Compass: fewest inner steps a silo is given."""
    q_max: int = 100
    """Compass: most inner steps a silo is given (a new group's steps)."""

    def __post_init__(self) -> None:
        _check(self.fragments >= 1, "strategy.fragments", "an integer >= 1", self.fragments)
        _check(
            self.fragment_pattern in ("strided", "contiguous"),
            "strategy.fragment_pattern",
            "'strided' or 'contiguous'",
            self.fragment_pattern,
        )
        _check(self.delay_steps >= 0, "strategy.delay_steps", "an integer >= 0", self.delay_steps)
        _check(
            0.0 <= self.mix_alpha <= 1.0, "strategy.mix_alpha", "a number in [0, 1]", self.mix_alpha
        )
        _check(
            self.zo_samples_per_round >= 1,
            "strategy.zo_samples_per_round",
            "an integer >= 1",
            self.zo_samples_per_round,
        )
        _check(self.zo_eps > 0, "strategy.zo_eps", "a number > 0", self.zo_eps)
        codings = ("off", "auto", "frc", "cyclic", "random")
        _check(self.coding in codings, "strategy.coding", f"one of {list(codings)}", self.coding)
        _check(self.stragglers >= 0, "strategy.stragglers", "an integer >= 0", self.stragglers)
        _check(
            self.scheduling in ("sync", "compass"),
            "strategy.scheduling",
            "'sync' or 'compass'",
            self.scheduling,
        )
        _check(self.q_min >= 1, "strategy.q_min", "an integer >= 1", self.q_min)
        _check(
            self.q_max >= self.q_min,
            "strategy.q_max",
            f"an integer >= q_min = {self.q_min}",
            self.q_max,
        )
        _check(self.zo_lr > 0, "strategy.zo_lr", "a number > 0", self.zo_lr)
        _check(
            self.zo_perturbation in ("rademacher", "gaussian"),
            "strategy.zo_perturbation",
            "'rademacher' or 'gaussian'",
            self.zo_perturbation,
        )
        from fedtrain.strategies.registry import strategy_names

        names = strategy_names()
        _check(self.name in names, "strategy.name", f"one of {list(names)}", self.name)
        _check(
            0.0 < self.outer_lr <= 10.0, "strategy.outer_lr", "a number in (0, 10]", self.outer_lr
        )
        _check(
            0.0 <= self.outer_momentum < 1.0,
            "strategy.outer_momentum",
            "a number in [0, 1)",
            self.outer_momentum,
        )
        _check(
            self.weighting in ("tokens", "equal"),
            "strategy.weighting",
            "'tokens' or 'equal'",
            self.weighting,
        )
