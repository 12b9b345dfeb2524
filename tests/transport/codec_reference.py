"""Today's torch codecs, kept verbatim as the reference the compiled codecs must equal.

The wire format is defined by these: every codec in fedtrain.transport.codecs is checked bitwise
against them (bytes and decoded values) in test_codecs.py and test_fuzz.py. Not used by the
package itself.
"""

# ruff: noqa
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import torch


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


class BlockCodec:
    def __init__(self, block_size=64, stochastic=False, generator=None):
        self.block_size = block_size
        self.stochastic = stochastic
        self.generator = generator

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


E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Nearest grid index by quarter-step region: every midpoint between grid values (0.25, 0.75,
# 1.25, 1.75, 2.5, 3.5, 5) is a multiple of 0.25, so floor(4v) decides the nearest value.
_NEAREST_BY_QUARTER = torch.tensor(
    [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7], dtype=torch.uint8
)


class Fp4Codec(BlockCodec):
    name = "fp4-e2m1"
    bits_per_value = 4.0

    def encode(self, flat: torch.Tensor) -> bytes:
        n = flat.numel()
        x = self._blocks(flat)
        bits = ceil_to_bf16_bits(self._absmax(x) / 6.0)  # stored scale s >= a/6
        scale = bf16_bits_to_float(bits)
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        xs = x.view(-1)[:n]
        v = (x * inv[:, None]).view(-1)[:n].abs_().clamp_(max=6.0)
        if self.stochastic:
            hi = torch.bucketize(v, E2M1_GRID).clamp_(1, 7)  # grid[hi-1] < v <= grid[hi]
            lo_v, hi_v = E2M1_GRID[hi - 1], E2M1_GRID[hi]
            up = torch.rand(v.shape, generator=self.generator) < (v - lo_v) / (hi_v - lo_v)
            idx = torch.where(up, hi, hi - 1).to(torch.uint8)
        else:
            # NaN (from a NaN/inf block) would index out of the table; its code is moot: the
            # block's stored scale is then NaN/inf, so it decodes non-finite and is rejected.
            idx = _NEAREST_BY_QUARTER[v.mul_(4.0).nan_to_num_(nan=0.0).to(torch.int32)]
        codes = idx.bitwise_or_((xs < 0).to(torch.uint8).bitwise_left_shift_(3))
        return self._scale_bytes(bits) + pack_nibbles(codes)

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        codes = unpack_nibbles(rest, numel)
        signed = torch.cat([E2M1_GRID, -E2M1_GRID])  # code = index | sign << 3
        return self._scale_(signed[codes.to(torch.int32)], scale)


class Sign1Codec(BlockCodec):
    name = "sign1"
    bits_per_value = 1.0

    def encode(self, flat: torch.Tensor) -> bytes:
        n = flat.numel()
        x = self._blocks(flat)
        counts = torch.full((x.shape[0],), float(self.block_size))
        tail = n - (x.shape[0] - 1) * self.block_size
        if x.shape[0]:
            counts[-1] = float(tail)  # the mean runs over real values only, not padding
        mean_abs = x.abs().sum(dim=1) / counts
        # Nearest bf16 (not ceil): contraction holds for any stored scale m̃ <= 2·m.
        bits = mean_abs.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        negative = x.reshape(-1)[:n] < 0
        return self._scale_bytes(bits) + pack_bits(negative)

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        negative = unpack_bits(rest, numel)
        mag = torch.repeat_interleave(scale, self.block_size)[:numel]
        return torch.where(negative, -mag, mag)
