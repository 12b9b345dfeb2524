"""What the round loop and the run assembly need from an engine (in-process simulation, Flower
deployment, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fedtrain.protocol.work import Work

__all__ = ["Engine", "Reply"]


@dataclass(slots=True)
class Reply:
    silo: str
    """Silo that sent it."""
    payload: bytes | None
    """Encoded reply, or None when the silo failed."""
    arrival_s: float
    """Seconds after the round started at which it arrived (engine clock: virtual or real)."""
    error: str | None = None
    """Why the silo failed, if it did."""
    node: int | None = None
    """Flower node id it came from, where known (for the failure log line)."""


class Engine(Protocol):
    """Delivers a round's work to the silos and yields their replies.

    Implemented by :class:`~fedtrain.simulation.inprocess.InProcessEngine` (virtual silos on a
    virtual clock), :class:`~fedtrain.server.flower_engine.FlowerEngine` (a Flower deployment)
    and :class:`~fedtrain.simulation.flower.SimulatedFlowerEngine` (Flower's simulation runtime).
    """

    silos: list[str]
    """Silo names, canonical order."""
    public_keys: dict[str, Any]
    """Silo -> Ed25519 public key its updates are signed with (empty: the run signs nothing)."""
    compute_s: dict[str, float]
    """Silo -> seconds it spent computing so far (engine clock)."""
    measured_step_time_s: float | None
    """Seconds per inner step measured on this machine (None: not measured, or real silos)."""

    def join(self, weights_payload: bytes | bytearray) -> int:
        """Send full global weights to every silo; return bytes sent in total."""
        ...

    def run_round(
        self,
        round: int,
        work: dict[str, Work],
        downlink: bytes | bytearray | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        """Deliver ``downlink`` (the last outer update) and ``work``; yield replies in arrival
        order, stopping at ``deadline_s`` (late replies may still be yielded, marked by time)."""
        ...

    def finish(self, downlink: bytes | bytearray | None) -> int:
        """Deliver the last outer update to every silo; return bytes sent in total."""
        ...

    def save_state(self, store: Any, full: bool) -> dict[str, Any]:
        """Engine facts for the commit record; with ``full``, also each silo's state as blobs
        under ``"silos"`` (engines whose silos persist their own state return none)."""
        ...

    def restore_state(self, store: Any, state: dict[str, Any]) -> None:
        """Inverse of :meth:`save_state` when resuming."""
        ...

    def sim_time_s(self) -> float | None:
        """Simulated seconds elapsed, or None for a real deployment."""
        ...

    def close_round(self, duration_s: float) -> None:
        """The coordinator closed the round after ``duration_s`` (engine clock)."""
        ...

    def round_stats(self) -> dict[str, Any]:
        """Extra fields for the closed round's metrics row (e.g. utilisation); may be empty."""
        ...

    def utilisation(self) -> float | None:
        """Compute time / elapsed time over the run, averaged over silos (None: not known)."""
        ...
