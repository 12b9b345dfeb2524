"""Section ``[simulation]`` and its ``[[simulation.profiles]]``: simulated silos' hardware and
network."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtrain.config.errors import check as _check

__all__ = ["SiloProfile", "SimulationSection"]


@dataclass(kw_only=True, slots=True)
class SiloProfile:
    name: str = "default"
    """Profile name (shows in events)."""
    count: int = 1
    """How many silos use this profile (profiles are assigned to silos in order)."""
    step_time_s: float = 0.0
    """Seconds per inner step on this silo's hardware; 0 = measured on this machine."""
    slowdown: float = 1.0
    """Multiplier on the step time (2.0 = half as fast)."""
    up_mbps: float = 100.0
    """Uplink bandwidth in Mbit/s."""
    down_mbps: float = 100.0
    """Downlink bandwidth in Mbit/s."""
    latency_ms: float = 20.0
    """One-way latency added to every transfer, in ms."""
    dropout: float = 0.0
    """Probability that the silo drops out of a round (no reply; it catches up next round)."""
    gpu: str = ""
    """Hardware profile ('h100', 'h200', 'a100'): with ``step_time_s = 0`` the step time is
    derived from the model's FLOPs (6 x params x tokens per step) / (peak bf16 x gpus x mfu)."""
    gpus: int = 1
    """GPUs per silo (with ``gpu``)."""
    mfu: float = 0.4
    """Model FLOPs utilisation the silo sustains (with ``gpu``)."""

    def __post_init__(self) -> None:
        key = f"simulation.profiles[{self.name}]"
        _check(self.count >= 1, f"{key}.count", "an integer >= 1", self.count)
        _check(self.step_time_s >= 0, f"{key}.step_time_s", "a number >= 0", self.step_time_s)
        _check(self.slowdown > 0, f"{key}.slowdown", "a number > 0", self.slowdown)
        _check(self.up_mbps > 0, f"{key}.up_mbps", "a number > 0", self.up_mbps)
        _check(self.down_mbps > 0, f"{key}.down_mbps", "a number > 0", self.down_mbps)
        _check(self.latency_ms >= 0, f"{key}.latency_ms", "a number >= 0", self.latency_ms)
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "a number in [0, 1)", self.dropout)
        from fedtrain.models.hardware import HARDWARE

        _check(
            self.gpu in ("", *HARDWARE),
            f"{key}.gpu",
            "'' or one of " + ", ".join(repr(g) for g in HARDWARE),
            self.gpu,
        )
        _check(self.gpus >= 1, f"{key}.gpus", "an integer >= 1", self.gpus)
        _check(0.0 < self.mfu <= 1.0, f"{key}.mfu", "a number in (0, 1]", self.mfu)


@dataclass(kw_only=True, slots=True)
class SimulationSection:
    engine: str = "inprocess"
    """Simulation engine: 'inprocess' (all silos in this process, virtual clock) or 'flower'
    (Flower's ServerApp/ClientApp under its simulation runtime on Ray; no virtual clock)."""
    profiles: list[SiloProfile] = field(default_factory=list)
    """Silo hardware/network profiles; empty = every silo gets the default profile."""
    step_time_jitter: float = 0.0
    """Log-normal sigma of a per-round, per-silo random slowdown (0 = none)."""
    bursty_b: int = 0
    """Bursty stragglers (B, W, λ): longest burst of rounds one silo straggles (0 = off)."""
    bursty_w: int = 5
    """Bursty stragglers: window W; in any W consecutive rounds at most λ silos straggle."""
    bursty_lambda: int = 1
    """Bursty stragglers: λ, silos that may straggle within one window."""
    bursty_rate: float = 0.3
    """Bursty stragglers: chance per round that a new burst starts (where the model allows)."""
    straggler_slowdown: float = 4.0
    """Step-time multiplier of a silo while it is in a bursty straggle."""
    analytic_params: float = 0.0
    """Analytic mode (``fedtrain simulate --analytic``): model parameters (0 = the preset's)."""
    analytic_layers: int = 0
    """Analytic mode: transformer layers (0 = the preset's)."""
    topology: str = "star"
    """Analytic mode: how silos synchronise. 'star' (fedtrain's coordinator: each silo sends its
    payload up and receives the result) or 'ring' (an all-reduce among the silos, as
    INTELLECT-1: 2(M-1) hops of 1/M of the payload, every hop at the slowest silo's link and
    charged the largest latency). Training runs have a coordinator, so they are star only."""
    coordinator_mbps: float = 0.0
    """Analytic mode, star: the coordinator's own link in Mbit/s each way, shared by the silos
    taking part (0 = not a bottleneck)."""

    def __post_init__(self) -> None:
        _check(self.bursty_b >= 0, "simulation.bursty_b", "an integer >= 0", self.bursty_b)
        _check(
            self.bursty_w > self.bursty_b or self.bursty_b == 0,
            "simulation.bursty_w",
            f"an integer > bursty_b = {self.bursty_b}",
            self.bursty_w,
        )
        _check(
            self.bursty_lambda >= 1,
            "simulation.bursty_lambda",
            "an integer >= 1",
            self.bursty_lambda,
        )
        _check(
            0.0 <= self.bursty_rate <= 1.0,
            "simulation.bursty_rate",
            "a number in [0, 1]",
            self.bursty_rate,
        )
        _check(
            self.straggler_slowdown >= 1.0,
            "simulation.straggler_slowdown",
            "a number >= 1",
            self.straggler_slowdown,
        )
        _check(
            self.engine in ("inprocess", "flower"),
            "simulation.engine",
            "'inprocess' or 'flower'",
            self.engine,
        )
        _check(
            self.analytic_params >= 0,
            "simulation.analytic_params",
            "a number >= 0",
            self.analytic_params,
        )
        _check(
            self.analytic_layers >= 0,
            "simulation.analytic_layers",
            "an integer >= 0",
            self.analytic_layers,
        )
        _check(
            self.topology in ("star", "ring"),
            "simulation.topology",
            "'star' or 'ring'",
            self.topology,
        )
        _check(
            self.coordinator_mbps >= 0,
            "simulation.coordinator_mbps",
            "a number >= 0",
            self.coordinator_mbps,
        )
        _check(
            not (self.topology == "ring" and self.coordinator_mbps),
            "simulation.coordinator_mbps",
            "0 with topology = 'ring' (an all-reduce has no coordinator in its data path)",
            self.coordinator_mbps,
        )
        _check(
            self.step_time_jitter >= 0,
            "simulation.step_time_jitter",
            "a number >= 0",
            self.step_time_jitter,
        )
