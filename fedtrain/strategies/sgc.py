"""Sequential gradient coding over independent jobs (Krishnan, Ebrahimi, Khisti, ICLR 2023).

Job t (one coded unit of work: e.g. a Streaming DiLoCo fragment whose result is needed T or
more syncs later, or one step of one of several concurrent runs) starts in round t and must be
decoded by the end of round t+T. Never use it across consecutive DiLoCo rounds: round t+1
starts from θ^(t), so its jobs are not independent.

The (B, W, λ)-bursty straggler model: in every window of W consecutive rounds at most λ
distinct workers straggle, and each worker's straggling rounds inside a window form one burst
of at most B consecutive rounds.

SR-SGC (selective repetition): an (n, s) gradient code with s = ⌈Bλ/(W−1+B)⌉ (load (s+1)/n per
worker and round, against GC's (λ+1)/n for the same guarantee) and delay T = B. In round t every
worker computes its coded task of job t — except that, when v > s workers did not deliver job
t−B's task in round t−B, v−s of them re-attempt that task in round t instead (their job-t slot
counts as missing). Job t is decoded from its results of rounds t and t+B once they decode
exactly (min-norm least squares, checked residual). A round whose straggler set does not conform
to the model is not trusted: the master waits for every worker that round (no stragglers), so a
non-conforming pattern costs time but never yields a wrong or missing decode.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fedtrain.strategies.gradient_coding import choose_construction, decode

__all__ = [
    "BurstyModel",
    "RoundOutcome",
    "SRSGC",
    "bursty_pattern",
    "sr_sgc_stragglers",
]


def sr_sgc_stragglers(b: int, w: int, lam: int) -> int:
    """s = ⌈Bλ/(W−1+B)⌉: the per-round tolerance SR-SGC needs under (B, W, λ)."""
    if not (1 <= b < w and lam >= 1):
        raise ValueError(f"need 1 <= B < W and λ >= 1; got B={b}, W={w}, λ={lam}")
    return math.ceil(b * lam / (w - 1 + b))


@dataclass(frozen=True, slots=True)
class BurstyModel:
    """The (B, W, λ)-bursty straggler model over ``n`` workers."""

    n: int
    b: int
    w: int
    lam: int

    def __post_init__(self) -> None:
        if not (1 <= self.b < self.w and 1 <= self.lam <= self.n):
            raise ValueError(
                f"need 1 <= B < W and 1 <= λ <= n; got B={self.b}, W={self.w}, λ={self.lam}, "
                f"n={self.n}"
            )

    def allows(self, history: list[set[int]], current: set[int]) -> bool:
        """Whether ``current`` stragglers may follow ``history`` (one set per past round)."""
        window = history[-(self.w - 1) :] if self.w > 1 else []
        rounds = [*window, current]
        if len(set().union(*rounds)) > self.lam:
            return False
        for worker in current:
            hits = [k for k, r in enumerate(rounds) if worker in r]
            # One burst inside the window: consecutive rounds, at most B of them.
            if hits[-1] - hits[0] + 1 > self.b or len(hits) != hits[-1] - hits[0] + 1:
                return False
        return True

    def conforms(self, pattern: list[set[int]]) -> bool:
        """Whether a whole pattern (one straggler set per round) conforms."""
        return all(self.allows(pattern[:t], pattern[t]) for t in range(len(pattern)))


def bursty_pattern(
    model: BurstyModel, rounds: int, rate: float, rng: random.Random
) -> list[set[int]]:
    """A random conforming pattern: each round up to λ new bursts (random worker, length 1..B)
    start, each with probability ``rate``, where the model allows them; running bursts go on."""
    pattern: list[set[int]] = []
    running: dict[int, int] = {}  # worker -> rounds of its burst still to come
    for _ in range(rounds):
        current = {w for w, left in running.items() if left > 0}
        for _ in range(model.lam):  # up to λ new bursts may start together
            if rng.random() >= rate:
                continue
            worker = rng.randrange(model.n)
            if worker not in current and model.allows(pattern, current | {worker}):
                current.add(worker)
                running[worker] = rng.randint(1, model.b)
        if not model.allows(pattern, current):  # a continuing burst the window now forbids
            current = {w for w in current if model.allows(pattern, {w})}
            while current and not model.allows(pattern, current):
                current.pop()
        running = {w: left - 1 for w, left in running.items() if left > 1 and w in current}
        pattern.append(current)
    return pattern


@dataclass(slots=True)
class RoundOutcome:
    round: int
    tasks: dict[int, int]
    """Worker -> the job whose coded task it computed this round."""
    delivered: set[int]
    """Workers whose result arrived (everyone, when the pattern did not conform)."""
    waited_for_all: bool
    """The round's stragglers broke the model: the master waited for every worker."""
    decoded: list[int] = field(default_factory=list)
    """Jobs that became decodable this round."""


class SRSGC:
    """SR-SGC master: assigns each round's tasks, tracks results, decodes jobs by t+B."""

    def __init__(self, n: int, model: BurstyModel, coding: str = "auto") -> None:
        if model.n != n:
            raise ValueError(f"straggler model is for {model.n} workers, not {n}")
        self.n = n
        self.model = model
        self.delay = model.b
        s = sr_sgc_stragglers(model.b, model.w, model.lam)
        self.name, self.s, self.b = choose_construction(n, min(s, n - 1), coding)
        self.results: dict[int, set[int]] = {}
        """Job -> workers whose coded task for it arrived."""
        self.decoded: dict[int, int] = {}
        """Job -> round in which it became decodable."""
        self.history: list[set[int]] = []
        """Stragglers the master accepted, per round."""
        self.waits = 0
        """Rounds that fell back to waiting for every worker."""

    @property
    def load(self) -> float:
        """Fraction of the whole job each worker computes per round: (s+1)/n."""
        return (self.s + 1) / self.n

    def _decodes(self, job: int) -> bool:
        return decode(self.b, sorted(self.results.get(job, ()))).exact

    def plan(self, t: int) -> dict[int, int]:
        """Worker -> job for round ``t`` (jobs are numbered by the round they start in)."""
        tasks = dict.fromkeys(range(self.n), t)
        old = t - self.delay
        if old >= 0 and old not in self.decoded:
            missing = sorted(set(range(self.n)) - self.results.get(old, set()))
            for worker in missing[: max(0, len(missing) - self.s)]:
                tasks[worker] = old
        return tasks

    def run_round(self, t: int, stragglers: set[int]) -> RoundOutcome:
        """Round ``t`` with these workers straggling (their results do not arrive)."""
        tasks = self.plan(t)
        conform = self.model.allows(self.history, stragglers)
        accepted = stragglers if conform else set()
        delivered = set(range(self.n)) - accepted
        self.history.append(accepted)
        self.waits += not conform
        outcome = RoundOutcome(t, tasks, delivered, waited_for_all=not conform)
        for worker in delivered:
            self.results.setdefault(tasks[worker], set()).add(worker)
        for job in sorted({tasks[w] for w in delivered}):
            if job not in self.decoded and self._decodes(job):
                self.decoded[job] = t
                outcome.decoded.append(job)
        due = t - self.delay
        if due >= 0 and due not in self.decoded:
            # Only possible when an earlier round broke the model in a way the wait did not
            # cover; waiting for the stragglers' results of job `due` keeps the guarantee.
            self.waits += 1
            self.results[due] = set(range(self.n))
            self.decoded[due] = t
            outcome.decoded.append(due)
            outcome.waited_for_all = True
        return outcome
