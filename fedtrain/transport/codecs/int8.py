"""Blockwise absmax int8: q = clamp(round(127·x/a), −127, 127), x̂ = q·a/127, |x − x̂| ≤ a/254."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
    bf16_bits_to_float,
    ceil_to_bf16_bits,
    readonly_tensor,
)

__all__ = ["Int8Codec"]


class Int8Codec(BlockCodec):
    name = "int8"
    bits_per_value = 8.0

    def encode(self, flat: torch.Tensor) -> bytes:
        x = self._blocks(flat)
        bits = ceil_to_bf16_bits(self._absmax(x))
        scale = bf16_bits_to_float(bits)
        inv = torch.where(scale > 0, 127.0 / scale, torch.zeros_like(scale))
        q = self._round(x * inv[:, None]).clamp_(-127, 127)
        values = q.view(-1)[: flat.numel()].to(torch.int8).numpy().tobytes()
        return self._scale_bytes(bits) + values

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        q = readonly_tensor(rest, torch.int8, numel).to(torch.float32)
        return self._scale_(q, scale / 127.0)
