"""Blockwise absmax int8: q = clamp(round(127·x/a), −127, 127), x̂ = q·a/127, |x − x̂| ≤ a/254."""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.transport.codecs.base import BlockCodec, bf16_bits_to_float, ceil_to_bf16_bits

__all__ = ["Int8Codec"]


class Int8Codec(BlockCodec):
    name = "int8"
    bits_per_value = 8.0

    def encode(self, flat: torch.Tensor) -> bytes:
        x = self._blocks(flat)
        bits = ceil_to_bf16_bits(x.abs().amax(dim=1))
        scale = bf16_bits_to_float(bits)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = self._round(x * (127.0 / safe)[:, None]).clamp_(-127, 127)
        values = q.reshape(-1)[: flat.numel()].to(torch.int8).numpy().tobytes()
        return self._scale_bytes(bits) + values

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        q = torch.from_numpy(np.frombuffer(rest, dtype=np.int8, count=numel).astype(np.float32))
        per_value = torch.repeat_interleave(scale / 127.0, self.block_size)[:numel]
        return q * per_value
