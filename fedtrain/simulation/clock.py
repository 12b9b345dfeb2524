"""Virtual time: a clock, a network model for transfers and a compute model for inner steps."""

from __future__ import annotations

import math
import random

from fedtrain.config import Config, SiloProfile
from fedtrain.data.stream import derive_seed

__all__ = ["SiloTiming", "StragglerModel", "VirtualClock", "profile_step_time", "transfer_time"]


def profile_step_time(profile: SiloProfile, params: float, tokens_per_step: float) -> float:
    """The profile's seconds per inner step: given, else derived from its hardware profile and
    the model's FLOPs; 0.0 when neither (the engine then measures this machine)."""
    if profile.step_time_s:
        return profile.step_time_s
    if profile.gpu:
        from fedtrain.models.hardware import step_time_from_flops

        return step_time_from_flops(params, tokens_per_step, profile.gpu, profile.gpus, profile.mfu)
    return 0.0


def transfer_time(nbytes: int, mbps: float, latency_ms: float) -> float:
    """Seconds to move ``nbytes`` over a ``mbps`` Mbit/s link with ``latency_ms`` latency.

    0 bytes cost nothing (no message is sent).
    """
    if nbytes <= 0:
        return 0.0
    return latency_ms / 1000.0 + nbytes * 8.0 / (mbps * 1e6)


class VirtualClock:
    """Monotone simulated time in seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"cannot move the clock back by {seconds}")
        self.now += seconds
        return self.now


class SiloTiming:
    """Compute and link timing of one simulated silo from its profile."""

    def __init__(
        self, profile: SiloProfile, step_time_s: float, jitter_sigma: float, seed: int, silo: str
    ) -> None:
        self.profile = profile
        self.step_time_s = step_time_s
        self.jitter_sigma = jitter_sigma
        self.seed = seed
        self.silo = silo

    def slowdown(self, round: int) -> float:
        """Profile slowdown times a seeded log-normal jitter for this round."""
        factor = self.profile.slowdown
        if self.jitter_sigma > 0:
            rng = random.Random(derive_seed(self.seed, "jitter", round, self.silo))
            factor *= math.exp(rng.gauss(0.0, self.jitter_sigma))
        return factor

    def compute_time(self, steps: int, round: int) -> float:
        return steps * self.step_time_s * self.slowdown(round)

    def down_time(self, nbytes: int) -> float:
        return transfer_time(nbytes, self.profile.down_mbps, self.profile.latency_ms)

    def up_time(self, nbytes: int) -> float:
        return transfer_time(nbytes, self.profile.up_mbps, self.profile.latency_ms)


class StragglerModel:
    """Simulated stragglers beyond the profiles' fixed slowdowns: per-round dropouts (profile
    ``dropout``) and a seeded (B, W, λ)-bursty pattern (``simulation.bursty_*``), during which a
    silo's steps take ``straggler_slowdown`` times longer."""

    def __init__(self, cfg: Config, silos: list[str]) -> None:
        self.seed = cfg.run.seed
        self.silos = silos
        self.dropout = {n: p.dropout for n, p in zip(silos, cfg.silo_profiles(), strict=True)}
        sim = cfg.simulation
        self.factor = sim.straggler_slowdown
        self.pattern: list[set[int]] = []
        if sim.bursty_b:
            from fedtrain.strategies.sgc import BurstyModel, bursty_pattern

            model = BurstyModel(len(silos), sim.bursty_b, sim.bursty_w, sim.bursty_lambda)
            rounds = cfg.total_inner_steps()  # an upper bound on the rounds of any strategy
            rng = random.Random(derive_seed(self.seed, "bursty"))
            self.pattern = bursty_pattern(model, rounds, sim.bursty_rate, rng)

    def dropped(self, silo: str, round: int) -> bool:
        p = self.dropout[silo]
        return p > 0 and random.Random(derive_seed(self.seed, "dropout", round, silo)).random() < p

    def straggling(self, round: int) -> set[int]:
        """Silo indices in a bursty straggle in ``round`` (1-based)."""
        return self.pattern[round - 1] if 0 < round <= len(self.pattern) else set()

    def slowdown(self, silo: str, round: int) -> float:
        return self.factor if self.silos.index(silo) in self.straggling(round) else 1.0
