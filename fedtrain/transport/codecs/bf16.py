"""bfloat16 (round to nearest even; 2 bytes per value)."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import Codec, readonly_tensor

__all__ = ["Bf16Codec"]


class Bf16Codec(Codec):
    name = "bf16"
    bits_per_value = 16.0

    def encoded_size(self, numel: int) -> int:
        return 2 * numel

    def encode(self, flat: torch.Tensor) -> bytes:
        b = flat.detach().reshape(-1).to(torch.bfloat16).contiguous().view(torch.int16)
        return b.numpy().astype("<i2", copy=False).tobytes()

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        return readonly_tensor(data, torch.bfloat16, numel).to(torch.float32)
