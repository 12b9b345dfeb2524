"""Exact signed bytes: integer values in [−127, 127], one byte each (the ZO one-byte codes)."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import Codec, readonly_tensor

__all__ = ["Code8Codec"]


class Code8Codec(Codec):
    """Internal codec for values that already are one-byte codes; not an update codec."""

    name = "code8"
    bits_per_value = 8.0
    internal = True

    def encoded_size(self, numel: int) -> int:
        return numel

    def encode(self, flat: torch.Tensor) -> bytes:
        q = flat.detach().reshape(-1).to(torch.float32)
        if not bool(((q == q.round()) & (q.abs() <= 127)).all()):
            raise ValueError("code8 carries integers in [-127, 127] only")
        return q.to(torch.int8).numpy().tobytes()

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        return readonly_tensor(data, torch.int8, numel).to(torch.float32)
