"""Blockwise absmax int4: q = round(7·x/a) in [−7, 7], two values per byte, |x − x̂| ≤ a/14."""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
    pack_nibbles,
)

__all__ = ["Int4Codec"]


class Int4Codec(BlockCodec):
    name = "int4"
    bits_per_value = 4.0

    def encode(self, flat: torch.Tensor) -> bytes:
        body = self._encode_compiled(flat, "int4")
        return self._encode_torch(flat) if body is None else body  # type: ignore[return-value]

    def _encode_torch(self, flat: torch.Tensor) -> bytes:
        bits, q = self._absmax_quantize(flat, 7)
        return self._scale_bytes(bits) + pack_nibbles(q.add_(8))  # codes 1..15; 0 unused

    _kind = "int4"

    def _factor(self, scale: np.ndarray) -> np.ndarray:
        return scale / np.float32(7.0)
