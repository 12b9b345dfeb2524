"""Blockwise absmax int8: q = clamp(round(127·x/a), −127, 127), x̂ = q·a/127, |x − x̂| ≤ a/254."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
    readonly_tensor,
)

__all__ = ["Int8Codec"]


class Int8Codec(BlockCodec):
    name = "int8"
    bits_per_value = 8.0

    def encode(self, flat: torch.Tensor) -> bytes:
        bits, q = self._absmax_quantize(flat, 127)
        return self._scale_bytes(bits) + q.to(torch.int8).numpy().tobytes()

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        q = readonly_tensor(rest, torch.int8, numel).to(torch.float32)
        return self._scale_(q, scale / 127.0)
