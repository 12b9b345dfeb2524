"""The run's cumulative counters, committed with every round and restored on resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunTotals"]


@dataclass(slots=True)
class RunTotals:
    """Totals over the run's rounds (summed over restarts); ``history`` holds the metrics rows."""

    rounds: int = 0
    rounds_failed: int = 0
    steps: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    """Broadcast updates (and the final one), all silos; excludes the one-off join."""
    bytes_join: int = 0
    """Full fp32 weights sent once to each joining silo."""
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    max_buffer_bytes: int = 0
    stragglers: int = 0
    rejected: int = 0
    values_up: int = 0
    """Values carried by decoded uplink payloads (for the compression ratio vs fp32)."""
    payload_bytes_up: int = 0
    """Bytes of those payloads."""
    values_down: int = 0
    """Values carried by broadcast updates (per copy)."""
    payload_bytes_down: int = 0
    """Bytes of those broadcasts (per copy)."""
    wall_s: float = 0.0
    """Real seconds spent in rounds (summed over restarts)."""
    max_payload_bytes: int = 0
    """Largest single uplink payload (the peak a silo's link must carry per sync)."""
    max_payload_values: int = 0
    """Most values in one decoded uplink payload."""
    strikes: dict[str, int] = field(default_factory=dict)
    """Rejected updates per silo (validation failures, duplicates, unsolicited replies)."""
    quarantined: dict[str, int] = field(default_factory=dict)
    """Silo -> round it was quarantined in (it gets no more work)."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Counters (not the history) for the commit record."""
        return {k: getattr(self, k) for k in self.__slots__ if k != "history"}  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, data: dict[str, Any], history: list[dict[str, Any]]) -> RunTotals:
        return cls(**data, history=history)

    def compression(self) -> dict[str, float | None]:
        """fp32 bytes of the values carried / bytes actually sent, per direction."""
        up = 4 * self.values_up / self.payload_bytes_up if self.payload_bytes_up else None
        down = 4 * self.values_down / self.payload_bytes_down if self.payload_bytes_down else None
        return {"up": up, "down": down}
