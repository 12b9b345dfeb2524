"""Compute-aware semi-asynchronous scheduling (FedCompass, Li et al. ICLR 2024): the scheduler.

Each silo's speed v_i (seconds per inner step) is an EMA (β = 0.9) of elapsed / steps. Silos are
organised in arrival groups with an expected time T_e and a latest time T_l = creation +
1.5·Q·v. A silo that comes back joins the group whose T_e it can meet with the largest
Q = ⌊(T_e − now)/v_i⌋ in [Q_min, Q_max]; if none fits it opens a new group with Q_max. Fast and
slow silos then arrive together, so nobody waits for the slowest. Late updates are weighted by
staleness s(τ) = (τ+1)^−0.5. (Pure scheduling; the clock is passed in as ``now``.)

:class:`CompassDiLoCo` runs DiLoCo on it: H becomes per silo (H_i = Q_i), each round is one
aggregation, closed when the earliest group's members are back (or, past its T_l, at the next
arrival). Pseudo-gradients
are normalised per inner step (Δ_i/H_i), weighted by tokens and staleness, and the outer step is
scaled by the mean H of the contributors. Silos not in the closing group keep computing; their
updates enter a later round with weight s(τ), τ = rounds since they were dispatched.
Difference from the paper: an update that arrives before its own group closes is aggregated in
the current round (with its staleness) instead of being held back for its group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedtrain.aggregation.mean import StreamingMean
from fedtrain.protocol.work import TrainWork, Work
from fedtrain.strategies.diloco import DiLoCo, outer_settings
from fedtrain.strategies.registry import BuildContext, StrategySpec

if TYPE_CHECKING:
    from fedtrain.config import Config

__all__ = [
    "SPEC",
    "Assignment",
    "CompassDiLoCo",
    "CompassMean",
    "CompassScheduler",
    "Group",
    "staleness_weight",
]


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
            g = self.open_group(now + q * v, now + 1.5 * q * v)
        else:
            q, g = best
        g.members.add(silo)
        return Assignment(group=g.gid, steps=q, finish=now + q * v)

    def open_group(self, expected: float, latest: float) -> Group:
        g = Group(gid=self._next, expected=expected, latest=latest)
        self.groups[g.gid] = g
        self._next += 1
        return g

    def arrive(self, silo: str, group: int) -> bool:
        """Record an arrival; True when the group is complete (aggregate now)."""
        g = self.groups[group]
        g.arrived.add(silo)
        return g.arrived >= g.members

    def close(self, group: int) -> Group:
        """Aggregation done: the group is retired."""
        return self.groups.pop(group)


class CompassMean(StreamingMean):
    """H̄ · Σ_i w_i·s(τ_i)·Δ_i/H_i / Σ_i w_i over a round's arrivals; done when every
    outstanding member of the closing group is in."""

    def __init__(self, target: set[str], latest: float = math.inf) -> None:
        super().__init__()
        self.target = set(target)
        self.latest = latest
        """The closing group's timer T_l: from then on, any arrival closes the round."""
        self.last_arrival = -math.inf
        self.token_weight = 0.0
        self.steps: dict[str, int] = {}
        self.staleness: dict[str, int] = {}

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        m = meta or {}
        h = max(1, int(m.get("steps", 1)))
        tau = int(m.get("staleness", 0))
        super().add(tensors, weight * staleness_weight(tau) / h, sender)
        self.token_weight += weight
        self.steps[sender] = h
        self.staleness[sender] = tau

    def done(self) -> bool:
        if not self.steps:
            return False
        return self.target <= set(self.steps) or self.last_arrival >= self.latest

    def mean(self) -> dict[str, torch.Tensor] | None:
        if self.token_weight <= 0:
            return None
        scale = sum(self.steps.values()) / len(self.steps) / self.token_weight
        for t in self._sum.values():
            t.mul_(scale)  # in place, like StreamingMean.mean
        return self._sum

    def report(self) -> dict[str, Any]:
        return {"steps_by_silo": dict(self.steps), "staleness": dict(self.staleness)}


class CompassDiLoCo(DiLoCo):
    """DiLoCo with FedCompass scheduling (Li et al. ICLR 2024): per-silo H_i, arrival groups."""

    name = "diloco-compass"
    async_replies = True

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        *,
        inner_steps: int,
        q_min: int,
        q_max: int,
        clock: Callable[[], float | None] | None = None,
        **outer: Any,
    ) -> None:
        super().__init__(params, inner_steps=inner_steps, **outer)
        self.scheduler = CompassScheduler(q_min, q_max)
        self.clock = clock or time.monotonic
        """Seconds now: the engine's clock (virtual in simulation; None or unset: real time)."""
        self.outstanding: dict[str, tuple[int, float, int]] = {}
        """Silo -> (group, dispatched at, steps) of its work in flight."""
        self._agg: CompassMean | None = None

    def _now(self) -> float:
        now = self.clock()
        return float(now) if now is not None else time.monotonic()

    def plan(self, round: int, silos: list[str], steps: int) -> dict[str, Work]:
        now = self._now()
        work: dict[str, Work] = {}
        first: Group | None = None
        for silo in silos:
            if silo in self.outstanding:
                continue  # still computing its last work
            if silo in self.scheduler.speed:
                a = self.scheduler.assign(silo, now)
                gid, q = a.group, a.steps
            else:  # speed unknown: a calibration group, everyone runs Q_max
                if first is None:
                    first = self.scheduler.open_group(math.inf, math.inf)
                first.members.add(silo)
                gid, q = first.gid, self.scheduler.q_max
            q = max(1, min(q, steps))
            self.outstanding[silo] = (gid, now, q)
            work[silo] = TrainWork(steps=q, group=gid)
        return work

    def _target(self) -> Group | None:
        """The group that closes next: the earliest expected one with members out whose timer
        T_l has not fired (members of a fired group are late: they count when they arrive)."""
        now = self._now()
        live = {g for g, _, _ in self.outstanding.values()}
        groups = [
            self.scheduler.groups[g]
            for g in live
            if g in self.scheduler.groups and self.scheduler.groups[g].latest > now
        ]
        return min(groups, key=lambda g: (g.expected, g.gid)) if groups else None

    def new_aggregator(self) -> CompassMean:
        """Closes when the next group is back, or at the first arrival after its timer T_l
        (nothing to aggregate at T_l: the round waits for the first update); only late work
        out: at the first arrival."""
        g = self._target()
        if g is None:
            self._agg = CompassMean(set(), latest=-math.inf)
        else:
            members = {s for s, (gid, _, _) in self.outstanding.items() if gid == g.gid}
            self._agg = CompassMean(members, latest=g.latest)
        return self._agg

    def received(self, silo: str, at: float, ok: bool) -> None:
        """A reply (or failure) from ``silo`` arrived at time ``at``: it is free again."""
        if self._agg is not None:
            self._agg.last_arrival = at
        if silo not in self.outstanding:
            return
        gid, since, steps = self.outstanding.pop(silo)
        if ok:
            self.scheduler.observe(silo, max(at - since, 1e-9), steps)
        g = self.scheduler.groups.get(gid)
        if g is not None:
            g.members.discard(silo)
            if not g.members:
                self.scheduler.close(gid)

    def state_tensors(self, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().state_tensors(copy)
        sch = self.scheduler
        meta["compass"] = {
            "speed": sch.speed,
            "next": sch._next,
            "groups": [
                [g.gid, g.expected, g.latest, sorted(g.members), sorted(g.arrived)]
                for g in sch.groups.values()
            ],
            "outstanding": {s: list(v) for s, v in self.outstanding.items()},
        }
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_state_tensors(tensors, meta)
        c = meta["compass"]
        sch = self.scheduler
        sch.speed = {k: float(v) for k, v in c["speed"].items()}
        sch._next = int(c["next"])
        sch.groups = {
            int(gid): Group(int(gid), float(e), float(lt), set(m), set(a))
            for gid, e, lt, m, a in c["groups"]
        }
        self.outstanding = {
            s: (int(g), float(t), int(q)) for s, (g, t, q) in c["outstanding"].items()
        }


def _check(cfg: Config) -> None:
    from fedtrain.config.errors import check

    st = cfg.strategy
    check(
        st.name in ("diloco", "fedavg"),
        "strategy.scheduling",
        f"'sync' with strategy.name = {st.name!r} (compass schedules DiLoCo rounds)",
        st.scheduling,
    )


def _build(cfg: Config, params: dict[str, torch.nn.Parameter], ctx: BuildContext) -> CompassDiLoCo:
    s = cfg.strategy
    return CompassDiLoCo(
        params,
        inner_steps=cfg.train.inner_steps,
        q_min=s.q_min,
        q_max=s.q_max,
        weighting=s.weighting,
        clock=ctx.clock,
        **outer_settings(s),
    )


SPEC = StrategySpec(
    name="compass",
    summary="DiLoCo with FedCompass scheduling (Li et al. ICLR 2024): per-silo H_i, groups",
    selected_by="scheduling",
    fields=("scheduling", "q_min", "q_max", "weighting", "outer_lr", "outer_momentum", "nesterov"),
    # Semi-asynchronous rounds need the in-process engine; deployed rounds are synchronous.
    engines=frozenset({"inprocess"}),
    error_feedback=False,
    async_replies=True,
    reasons={
        "error_feedback": "a silo may miss several broadcasts, so the acknowledgement of its "
        "update is not in the next one",
        "trees": "compass merges arrival groups with staleness weights in its own aggregator",
    },
    steps_per_round=lambda cfg: cfg.train.inner_steps,
    check=_check,
    build=_build,
)
"""Compass scheduling (``strategy.scheduling = 'compass'``)."""
