"""Accelerator profiles and the FLOPs model of one inner step."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HARDWARE", "Hardware", "flops_per_step", "step_time_from_flops"]


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    peak_bf16_flops: float
    """Dense bf16 peak, FLOP/s (no sparsity)."""
    memory_gib: float


HARDWARE: dict[str, Hardware] = {
    # Vendor datasheets, SXM parts, dense bf16 tensor-core peak.
    "h100": Hardware("NVIDIA H100 SXM", 989.4e12, 80.0),
    "h200": Hardware("NVIDIA H200 SXM", 989.4e12, 141.0),
    "a100": Hardware("NVIDIA A100 SXM", 312.0e12, 80.0),
}


def flops_per_step(params: float, tokens_per_step: float) -> float:
    """Training FLOPs of one inner step: 6 x params x tokens (forward 2, backward 4; attention
    score FLOPs are left out, as in the usual 6ND estimate)."""
    return 6.0 * params * tokens_per_step


def step_time_from_flops(
    params: float, tokens_per_step: float, gpu: str, gpus: int = 1, mfu: float = 0.4
) -> float:
    """Seconds per inner step of a ``params`` model on ``gpus`` x ``gpu`` at ``mfu``."""
    if gpu not in HARDWARE:
        raise ValueError(f"unknown hardware profile {gpu!r}; known: {', '.join(HARDWARE)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    return flops_per_step(params, tokens_per_step) / (HARDWARE[gpu].peak_bf16_flops * gpus * mfu)
