"""Codecs: turn an fp32 tensor into compact bytes and back.

A codec is one small class registered by name in :data:`CODECS`; a new codec is one new class
plus one registry line. Codecs work on flat fp32 tensors; shapes travel in the payload header.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

__all__ = ["CODECS", "Codec", "Fp32Codec", "get_codec"]


class Codec(ABC):
    """Encode/decode one flat fp32 tensor."""

    name: str

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Exact number of body bytes for ``numel`` values."""

    @abstractmethod
    def encode(self, flat: torch.Tensor) -> bytes:
        """Bytes for ``flat`` (1-D fp32)."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        """1-D fp32 tensor of ``numel`` values from ``data`` (``len(data) == encoded_size``)."""


class Fp32Codec(Codec):
    """Lossless little-endian float32."""

    name = "fp32"

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def encode(self, flat: torch.Tensor) -> bytes:
        arr = flat.detach().to(torch.float32).contiguous().cpu().numpy()
        return arr.astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        arr = np.frombuffer(data, dtype="<f4", count=numel)
        return torch.from_numpy(arr.copy())


CODECS: dict[str, type[Codec]] = {
    "fp32": Fp32Codec,
}


def get_codec(name: str) -> Codec:
    """Instantiate the codec registered as ``name``."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(CODECS)}") from None
