"""Lossless float32 (the baseline every ratio is measured against)."""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.transport.codecs.base import Codec

__all__ = ["Fp32Codec"]


class Fp32Codec(Codec):
    name = "fp32"
    bits_per_value = 32.0

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def encode(self, flat: torch.Tensor) -> bytes:
        arr = flat.detach().reshape(-1).to(torch.float32).contiguous().numpy()
        return arr.astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(data, dtype="<f4", count=numel).copy())

    def all_finite(self, data: bytes | memoryview, numel: int) -> bool:
        """Checked on the bytes in place, a slice at a time (no decoded copy)."""
        values = np.frombuffer(data, dtype="<f4", count=numel)
        step = 1 << 20
        return all(bool(np.isfinite(values[i : i + step]).all()) for i in range(0, numel, step))
