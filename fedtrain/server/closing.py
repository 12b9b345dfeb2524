"""When a round closes: pluggable conditions, always bounded by the round deadline."""

from __future__ import annotations

from typing import Protocol

from fedtrain.config import RoundSection

__all__ = ["AllReplied", "CloseCondition", "Quorum", "close_condition"]


class CloseCondition(Protocol):
    def should_close(self, valid: int, seen: int, expected: int) -> bool:
        """True once enough replies are in (``seen`` includes rejected ones)."""
        ...


class AllReplied:
    """Wait for every silo that was sent work (or the deadline)."""

    def should_close(self, valid: int, seen: int, expected: int) -> bool:
        return seen >= expected


class Quorum:
    """Close as soon as ``k`` valid replies are in (first-k rounds)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def should_close(self, valid: int, seen: int, expected: int) -> bool:
        return valid >= self.k or seen >= expected


def close_condition(cfg: RoundSection) -> CloseCondition:
    """The condition named by ``round.close_when``."""
    return Quorum(cfg.min_silos) if cfg.close_when == "quorum" else AllReplied()
