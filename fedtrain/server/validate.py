"""Checks an update must pass before it counts toward the aggregate."""

from __future__ import annotations

import torch

from fedtrain.transport.payload import Payload

__all__ = ["UpdateRejected", "validate_update"]


class UpdateRejected(ValueError):
    """A decoded update does not fit the round or the model; the message is the reason."""


def validate_update(
    payload: Payload,
    *,
    run_id: str,
    round: int,
    silo: str,
    kind: str,
    params: dict[str, torch.nn.Parameter],
    names: list[str] | None = None,
    shapes: dict[str, list[int]] | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``payload`` is this silo's finite ``round`` update."""
    if payload.run_id != run_id:
        raise UpdateRejected(f"payload belongs to run {payload.run_id!r}, not {run_id!r}")
    if payload.round != round:
        raise UpdateRejected(f"payload is for round {payload.round}, expected {round}")
    if payload.sender != silo:
        raise UpdateRejected(f"payload was sent by {payload.sender!r}, expected {silo!r}")
    if payload.kind != kind:
        raise UpdateRejected(f"payload kind {payload.kind!r}, expected {kind!r}")
    got, want = set(payload.tensors), set(names if names is not None else params)
    if got != want:
        extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
        raise UpdateRejected(f"parameter names differ (unexpected {extra}, missing {missing})")
    for name, t in payload.tensors.items():
        want_shape = tuple(shapes[name]) if shapes and name in shapes else tuple(params[name].shape)
        if tuple(t.shape) != want_shape:
            raise UpdateRejected(f"{name}: shape {tuple(t.shape)} != {want_shape}")
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"{name}: contains NaN or infinite values")
