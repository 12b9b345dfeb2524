"""Checks an update must pass before it counts toward the aggregate.

:class:`UpdateValidator` takes a reply's raw bytes and either returns the decoded update or
raises :class:`UpdateRejected` with the reason, in this order: size limit (before any parsing),
framing / checksum / signature (:func:`~fedtrain.transport.payload.decode_payload`), run id,
round (no replay of another round's payload), sender (no other silo's payload), kind, key set,
shapes, dtypes, finite values, and the norm bound (reject, or clip to the bound).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtrain.config import ReliabilitySection
from fedtrain.transport.payload import LazyTensors, Payload, PayloadError, decode_payload

__all__ = ["UpdateRejected", "UpdateValidator", "default_max_payload_bytes", "validate_update"]


class UpdateRejected(ValueError):
    """A reply does not fit the round or the model; the message is the reason."""


def default_max_payload_bytes(n_params: int) -> int:
    """Twice the fp32 model plus 1 MiB: room for any codec and the header, nothing absurd."""
    return 8 * n_params + (1 << 20)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


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
        raise UpdateRejected(f"payload is for round {payload.round}, expected {round} (replay?)")
    if payload.sender != silo:
        raise UpdateRejected(f"payload was sent by {payload.sender!r}, expected {silo!r}")
    if payload.kind != kind:
        raise UpdateRejected(f"payload kind {payload.kind!r}, expected {kind!r}")
    got, want = set(payload.tensors), set(names if names is not None else params)
    if got != want:
        extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
        raise UpdateRejected(f"parameter names differ (unexpected {extra}, missing {missing})")
    tensors = payload.tensors
    lazy = tensors if isinstance(tensors, LazyTensors) else None
    for name in tensors:
        shape = lazy.shape_of(name) if lazy is not None else tuple(tensors[name].shape)
        want_shape = tuple(shapes[name]) if shapes and name in shapes else tuple(params[name].shape)
        if tuple(shape) != want_shape:
            raise UpdateRejected(f"{name}: shape {tuple(shape)} != {want_shape}")
        sent = payload.dtypes.get(name)
        if name in params and sent is not None and sent != _dtype_name(params[name]):
            raise UpdateRejected(f"{name}: dtype {sent} != {_dtype_name(params[name])}")
        if lazy is not None:
            reason = lazy.malformed(name)
            if reason is not None:
                raise UpdateRejected(f"{name}: {reason}")
            finite = lazy.all_finite(name)  # from the codec's scales where it can
        else:
            finite = bool(torch.isfinite(tensors[name]).all())
        if not finite:
            raise UpdateRejected(f"{name}: contains NaN or infinite values")


class UpdateValidator:
    """Everything a reply must pass, with the run's limits and the silos' public keys."""

    def __init__(
        self,
        *,
        run_id: str,
        params: dict[str, torch.nn.Parameter],
        kind: str,
        limits: ReliabilitySection,
        public_keys: dict[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.params = params
        self.kind = kind
        self.limits = limits
        self.public_keys = public_keys
        """Silo -> Ed25519 public key when signatures are required, else None."""
        n_params = sum(p.numel() for p in params.values())
        self.max_bytes = limits.max_payload_bytes or default_max_payload_bytes(n_params)

    def check(
        self,
        data: bytes | memoryview,
        *,
        silo: str,
        round: int,
        names: list[str] | None = None,
        shapes: dict[str, list[int]] | None = None,
    ) -> Payload:
        """The valid (possibly norm-clipped) update, its tensors decoded when read (a
        :class:`~fedtrain.transport.payload.LazyTensors`), or :class:`UpdateRejected`."""
        if len(data) > self.max_bytes:
            raise UpdateRejected(
                f"payload of {len(data)} bytes exceeds reliability.max_payload_bytes = "
                f"{self.max_bytes}"
            )
        key = None
        if self.public_keys is not None:
            key = self.public_keys.get(silo)
            if key is None:
                raise UpdateRejected(f"no public key for silo {silo!r}")
        try:
            # Lazily: each tensor is decoded when it is folded into the aggregate, one at a time.
            payload = decode_payload(data, public_key=key, lazy=True)
        except PayloadError as e:
            raise UpdateRejected(str(e)) from None
        validate_update(
            payload,
            run_id=self.run_id,
            round=round,
            silo=silo,
            kind=self.kind,
            params=self.params,
            names=names,
            shapes=shapes,
        )
        bound = self.limits.max_update_norm
        if bound > 0:
            squares = (float(t.double().square().sum()) for t in payload.tensors.values())
            norm = math.sqrt(sum(squares))
            if norm > bound:
                if self.limits.norm_action == "reject":
                    raise UpdateRejected(
                        f"update norm {norm:.4g} exceeds reliability.max_update_norm = {bound:g}"
                    )
                scale = bound / norm
                assert isinstance(payload.tensors, LazyTensors)
                payload.tensors = payload.tensors.scaled(scale)
                payload.meta = {**payload.meta, "clipped_from_norm": norm}
        return payload
