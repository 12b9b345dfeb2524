"""The codec interface and the blockwise helpers the quantizing codecs share.

A codec encodes one flat fp32 tensor into bytes and back. Blockwise codecs cut the tensor into
blocks of ``block_size`` values (the last one padded with zeros for the arithmetic only), store
one scale per block as bf16 and the values packed; the body of ``n`` values is exactly
``encoded_size(n)`` bytes.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "BlockCodec",
    "Codec",
    "bf16_bits_to_float",
    "ceil_to_bf16_bits",
    "readonly_tensor",
    "pack_bits",
    "pack_nibbles",
    "unpack_bits",
    "unpack_nibbles",
]


class Codec(ABC):
    """Encode/decode one flat fp32 tensor."""

    name: str
    bits_per_value: float
    """Bits per value excluding scales (documentation and metering)."""

    def __init__(
        self,
        block_size: int = 64,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if block_size < 1 or block_size > 1 << 20:
            raise ValueError(f"block_size must be in [1, 2^20], got {block_size}")
        self.block_size = block_size
        self.stochastic = stochastic
        self.generator = generator

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Exact number of body bytes for ``numel`` values."""

    @abstractmethod
    def encode(self, flat: torch.Tensor) -> bytes:
        """Bytes for ``flat`` (1-D, converted to fp32)."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        """1-D fp32 tensor of ``numel`` values from exactly ``encoded_size(numel)`` bytes."""

    def roundtrip(self, flat: torch.Tensor) -> torch.Tensor:
        """``decode(encode(flat))``: what the receiver will see."""
        return self.decode(self.encode(flat), flat.numel())


def ceil_to_bf16_bits(a: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int32 in [0, 2^16)) of the smallest bf16 >= each non-negative ``a``.

    Scales are rounded UP so that |x| / stored_scale <= 1: quantizing with the stored scale keeps
    every value in range and the error bounds hold with respect to the stored scale.
    """
    bits = a.contiguous().to(torch.float32).view(torch.int32).to(torch.int64)
    up = (bits + 0xFFFF) >> 16
    return up.to(torch.int32)


def bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of bf16 bit patterns."""
    return (bits.to(torch.int64) << 16).to(torch.int32).view(torch.float32)


def readonly_tensor(data: bytes | memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A tensor viewing ``count`` values of ``data`` without copying; callers only read it."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": we never write
        return torch.frombuffer(data, dtype=dtype, count=count)


def pack_nibbles(q: torch.Tensor) -> bytes:
    """Pack 4-bit codes (uint8 values in [0, 15]) two per byte, low nibble first."""
    codes = q.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    packed = pairs[:, 1].bitwise_left_shift(4).bitwise_or_(pairs[:, 0])
    return packed.numpy().tobytes()


def unpack_nibbles(data: bytes | memoryview, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` (uint8 codes)."""
    arr = readonly_tensor(data, torch.uint8, len(data))
    out = torch.empty(arr.numel() * 2, dtype=torch.uint8)
    pairs = out.view(-1, 2)
    torch.bitwise_and(arr, 0x0F, out=pairs[:, 0])
    torch.bitwise_right_shift(arr, 4, out=pairs[:, 1])
    return out[:numel]


def pack_bits(bits: torch.Tensor) -> bytes:
    """Pack booleans eight per byte (little bit order)."""
    return np.packbits(bits.numpy().astype(np.uint8), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    arr = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel, bitorder="little")
    return torch.from_numpy(arr.astype(bool))


class BlockCodec(Codec):
    """A codec with one bf16 scale per block followed by packed values."""

    # Integer arithmetic: exact for any count a header may claim (a float overflows past 1e308).
    def _n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _value_bytes(self, numel: int) -> int:
        return math.ceil(numel * Fraction(self.bits_per_value) / 8)

    def encoded_size(self, numel: int) -> int:
        return 2 * self._n_blocks(numel) + self._value_bytes(numel)

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """``(n_blocks, block_size)`` fp32 view of ``flat`` padded with zeros (no copy if full)."""
        x = flat.detach().reshape(-1).to(torch.float32)
        pad = self._n_blocks(x.numel()) * self.block_size - x.numel()
        if pad:
            x = torch.cat([x, x.new_zeros(pad)])
        return x.view(-1, self.block_size)

    @staticmethod
    def _absmax(x: torch.Tensor) -> torch.Tensor:
        """Per-row max |x| in one pass (no |x| temporary)."""
        lo, hi = torch.aminmax(x, dim=1)
        return torch.maximum(lo.neg_(), hi)

    def _scale_(self, values: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
        """Multiply flat ``values`` in place by their block's factor (no per-value expansion)."""
        n, b = values.numel(), self.block_size
        full = n // b
        if full:
            values[: full * b].view(full, b).mul_(per_block[:full, None])
        if n % b:
            values[full * b :].mul_(per_block[full])
        return values

    def _split(self, data: bytes | memoryview, numel: int) -> tuple[torch.Tensor, memoryview]:
        """Stored scales (fp32, one per block) and the packed value bytes."""
        nb = self._n_blocks(numel)
        mv = memoryview(data)
        bits = torch.from_numpy(np.frombuffer(mv[: 2 * nb], dtype="<u2").astype(np.int32))
        return bf16_bits_to_float(bits), mv[2 * nb :]

    @staticmethod
    def _scale_bytes(bits: torch.Tensor) -> bytes:
        return bits.numpy().astype("<u2").tobytes()

    def _absmax_quantize(
        self, flat: torch.Tensor, levels: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored bf16 scale bits per block and integer codes q = round(levels·x/a) in
        [−levels, levels] (as floats), quantized with the stored (rounded-up) scale a."""
        x = self._blocks(flat)
        bits = ceil_to_bf16_bits(self._absmax(x))
        scale = bf16_bits_to_float(bits)
        inv = torch.where(scale > 0, levels / scale, torch.zeros_like(scale))
        q = self._round(x * inv[:, None]).clamp_(-levels, levels)
        return bits, q.view(-1)[: flat.numel()]

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        """Round to integers: nearest, or stochastically (unbiased: E[round(v)] = v)."""
        if not self.stochastic:
            return torch.round(v)
        u = torch.rand(v.shape, generator=self.generator)
        return torch.floor(v + u)
