"""Compute-aware semi-asynchronous scheduling (FedCompass, Li et al. ICLR 2024): the scheduler.

Each silo's speed v_i (seconds per inner step) is an EMA (β = 0.9) of elapsed / steps. Silos are
organised in arrival groups with an expected time T_e and a latest time T_l = creation +
1.5·Q·v. A silo that comes back joins the group whose T_e it can meet with the largest
Q = ⌊(T_e − now)/v_i⌋ in [Q_min, Q_max]; if none fits it opens a new group with Q_max. Fast and
slow silos then arrive together, so nobody waits for the slowest. Late updates are weighted by
staleness s(τ) = (τ+1)^−0.5. (Pure scheduling; the clock is passed in as ``now``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Assignment", "CompassScheduler", "Group", "staleness_weight"]


def staleness_weight(tau: int) -> float:
    """s(τ) = (τ + 1)^−0.5 for an update τ groups late."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return (tau + 1) ** -0.5


@dataclass(slots=True)
class Group:
    gid: int
    expected: float
    """T_e: when its members are expected back."""
    latest: float
    """T_l: a timer forces aggregation then."""
    members: set[str] = field(default_factory=set)
    arrived: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Assignment:
    group: int
    steps: int
    """Q_i: inner steps the silo runs before coming back."""
    finish: float
    """now + Q_i·v_i: when it is expected back."""


class CompassScheduler:
    def __init__(self, q_min: int = 20, q_max: int = 100, beta: float = 0.9) -> None:
        if not 1 <= q_min <= q_max:
            raise ValueError(f"need 1 <= q_min <= q_max, got {q_min}, {q_max}")
        self.q_min, self.q_max, self.beta = q_min, q_max, beta
        self.speed: dict[str, float] = {}
        self.groups: dict[int, Group] = {}
        self._next = 0

    def observe(self, silo: str, elapsed: float, steps: int) -> float:
        """Update the silo's speed estimate from a finished job; return it."""
        v = elapsed / steps
        self.speed[silo] = (
            v if silo not in self.speed else (self.beta * self.speed[silo] + (1 - self.beta) * v)
        )
        return self.speed[silo]

    def assign(self, silo: str, now: float) -> Assignment:
        """Put a returning silo into the best open group, or open a new one."""
        v = self.speed[silo]
        best: tuple[int, Group] | None = None
        for g in self.groups.values():
            if g.expected <= now or g.arrived:
                continue  # past, or already aggregating
            q = math.floor((g.expected - now) / v)
            # Only groups it can meet with Q in [Q_min, Q_max]: a larger Q would mean arriving
            # early and idling, a smaller one too little work.
            if self.q_min <= q <= self.q_max and (best is None or q > best[0]):
                best = (q, g)
        if best is None:
            q = self.q_max
            g = Group(gid=self._next, expected=now + q * v, latest=now + 1.5 * q * v)
            self.groups[g.gid] = g
            self._next += 1
        else:
            q, g = best
        g.members.add(silo)
        return Assignment(group=g.gid, steps=q, finish=now + q * v)

    def arrive(self, silo: str, group: int) -> bool:
        """Record an arrival; True when the group is complete (aggregate now)."""
        g = self.groups[group]
        g.arrived.add(silo)
        return g.arrived >= g.members

    def close(self, group: int) -> Group:
        """Aggregation done: the group is retired."""
        return self.groups.pop(group)
