"""The overlap arithmetic of a synchronisation, and the Streaming DiLoCo paper's sync model.

:func:`exposed_comm_s` is what both the analytic run (:mod:`fedtrain.simulation.analytic`) and
:class:`SyncModel` charge for one sync. :class:`SyncModel` keeps the assumptions of the paper's
simulator that ``bench/streaming_table4.py`` reproduces: an M-worker ring all-reduce
(2(M-1)/M x S on a worker's link), no latency, every sync overlapping the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BANDWIDTH_GRID_GBPS",
    "METHODS",
    "SyncModel",
    "exposed_comm_s",
    "required_bandwidth",
    "utilisation",
]

BANDWIDTH_GRID_GBPS: tuple[float, ...] = tuple(10 ** (-1 + 4 * k / 49) for k in range(50))
"""50 log-spaced bandwidths from 0.1 to 1000 Gbit/s (the grid the Table 4 values fall on)."""

METHODS = ("ddp", "diloco", "streaming")


def exposed_comm_s(
    chunk_s: Sequence[float],
    layers: int,
    step_time_s: float,
    *,
    backward_fraction: float = 2 / 3,
    hide_s: float = 0.0,
    latency_s: float = 0.0,
) -> float:
    """Seconds a silo waits for one sync whose per-layer chunks take ``chunk_s`` on the link.

    Chunk i is ready when the backward pass has finished i+1 layers; the link carries one chunk
    at a time. The sync is exposed for whatever runs past the end of the backward pass plus
    ``hide_s`` of further compute (overlap τ x step time). ``latency_s`` is paid once.
    """
    per_layer = backward_fraction * step_time_s / layers
    free = 0.0
    for i, c in enumerate(chunk_s):
        free = max((i + 1) * per_layer, free) + c
    end = free + latency_s
    return max(0.0, end - layers * per_layer - hide_s)


@dataclass(frozen=True, slots=True)
class SyncModel:
    """One method's compute and communication pattern at one scale (see the module doc)."""

    params: float
    layers: int
    step_time_s: float
    method: str
    inner_steps: int = 100
    """H: inner steps between syncs of the same parameters (ignored for ddp)."""
    fragments: int = 1
    """Streaming: P fragments of layers/P layers each, one synced every H/P steps."""
    overlap_steps: int = 0
    """Streaming: τ inner steps a fragment's exchange may hide behind."""
    bits_per_param: float = 16.0
    workers: int = 2
    collective: str = "ring"
    latency_s: float = 0.0
    backward_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.collective not in ("ring", "star"):
            raise ValueError(f"collective must be 'ring' or 'star', got {self.collective!r}")
        if self.layers < 1 or self.params <= 0 or self.step_time_s <= 0:
            raise ValueError("params, layers and step_time_s must be positive")
        if self.method == "streaming" and self.layers % self.fragments:
            raise ValueError(
                f"{self.fragments} fragments must divide the layers ({self.layers}); "
                "(H/P need not be an integer: the period is H steps with P syncs)"
            )

    @property
    def traffic_factor(self) -> float:
        """Bits on a silo's link per bit of payload."""
        if self.collective == "star":
            return 2.0
        return 2.0 * (self.workers - 1) / self.workers

    def period(self, gbps: float) -> tuple[float, float]:
        """(compute seconds, wall seconds) of one period of the method at ``gbps`` Gbit/s."""
        per_layer_bits = self.params * self.bits_per_param * self.traffic_factor / self.layers
        chunk = per_layer_bits / (gbps * 1e9)
        kw = {"backward_fraction": self.backward_fraction, "latency_s": self.latency_s}
        t = self.step_time_s
        if self.method == "ddp":
            return t, t + exposed_comm_s([chunk] * self.layers, self.layers, t, **kw)
        if self.method == "diloco":
            wait = exposed_comm_s([chunk] * self.layers, self.layers, t, **kw)
            return self.inner_steps * t, self.inner_steps * t + wait
        frag = self.layers // self.fragments
        hide = self.overlap_steps * t
        wait = exposed_comm_s([chunk] * frag, self.layers, t, hide_s=hide, **kw)
        return self.inner_steps * t, self.inner_steps * t + self.fragments * wait


def utilisation(model: SyncModel, gbps: float) -> float:
    """Compute time / wall time in the steady state at ``gbps`` Gbit/s."""
    compute, wall = model.period(gbps)
    return compute / wall


def required_bandwidth(
    model: SyncModel, target: float, grid: Sequence[float] = BANDWIDTH_GRID_GBPS
) -> float | None:
    """The smallest bandwidth of ``grid`` at which utilisation reaches ``target`` (None: none
    of them does). Utilisation is monotone in bandwidth, so this is a grid search."""
    for g in grid:
        if utilisation(model, g) >= target - 1e-12:
            return g
    return None
