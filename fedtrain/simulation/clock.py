"""Virtual time: a clock, a network model for transfers and a compute model for inner steps."""

from __future__ import annotations

import math
import random

from fedtrain.config import SiloProfile
from fedtrain.data.stream import derive_seed

__all__ = ["SiloTiming", "VirtualClock", "transfer_time"]


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
