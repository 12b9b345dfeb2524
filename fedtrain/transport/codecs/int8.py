"""Blockwise absmax int8: q = clamp(round(127·x/a), −127, 127), x̂ = q·a/127, |x − x̂| ≤ a/254."""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
)

__all__ = ["Int8Codec"]


class Int8Codec(BlockCodec):
    name = "int8"
    bits_per_value = 8.0

    def encode(self, flat: torch.Tensor) -> bytes:
        body = self._encode_compiled(flat, "int8")
        return self._encode_torch(flat) if body is None else body  # type: ignore[return-value]

    def _encode_torch(self, flat: torch.Tensor) -> bytes:
        bits, q = self._absmax_quantize(flat, 127)
        return self._scale_bytes(bits) + q.to(torch.int8).numpy().tobytes()

    _kind = "int8"

    def _factor(self, scale: np.ndarray) -> np.ndarray:
        return scale / np.float32(127.0)
