"""Blockwise absmax int4: q = round(7·x/a) in [−7, 7], two values per byte, |x − x̂| ≤ a/14."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = ["Int4Codec"]


class Int4Codec(BlockCodec):
    name = "int4"
    bits_per_value = 4.0

    def encode(self, flat: torch.Tensor) -> bytes:
        bits, q = self._absmax_quantize(flat, 7)
        return self._scale_bytes(bits) + pack_nibbles(q.add_(8))  # codes 1..15; 0 unused

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        q = unpack_nibbles(rest, numel).to(torch.float32).sub_(8.0)
        return self._scale_(q, scale / 7.0)
