"""Blockwise FP4 E2M1: values on {0, .5, 1, 1.5, 2, 3, 4, 6}·sign times a per-block scale a/6.

Error ≤ 0.25·max(|x|, a/6) (half the grid spacing, relative to the stored scale). As the paper
(Streaming DiLoCo) found, lowering precision this way beats zeroing values.
"""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import (
    BlockCodec,
    bf16_bits_to_float,
    ceil_to_bf16_bits,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = ["E2M1_GRID", "Fp4Codec"]

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_MIDPOINTS = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2


class Fp4Codec(BlockCodec):
    name = "fp4-e2m1"
    bits_per_value = 4.0

    def encode(self, flat: torch.Tensor) -> bytes:
        x = self._blocks(flat)
        bits = ceil_to_bf16_bits(x.abs().amax(dim=1) / 6.0)  # stored scale s >= a/6
        scale = bf16_bits_to_float(bits)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        v = (x.abs() / safe[:, None]).clamp_(max=6.0).reshape(-1)[: flat.numel()]
        if self.stochastic:
            hi = torch.bucketize(v, E2M1_GRID, right=False).clamp_(
                1, 7
            )  # grid[hi-1] < v <= grid[hi]
            lo_v, hi_v = E2M1_GRID[hi - 1], E2M1_GRID[hi]
            p_up = (v - lo_v) / (hi_v - lo_v)
            up = torch.rand(v.shape, generator=self.generator) < p_up
            idx = torch.where(up, hi, hi - 1)
        else:
            idx = torch.bucketize(v, _MIDPOINTS)  # nearest grid point
        sign = (x.reshape(-1)[: flat.numel()] < 0).to(torch.int64)
        codes = (idx | (sign << 3)).to(torch.uint8)
        return self._scale_bytes(bits) + pack_nibbles(codes)

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        scale, rest = self._split(data, numel)
        codes = unpack_nibbles(rest, numel)
        mag = E2M1_GRID[codes & 7]
        signed = torch.where((codes & 8) > 0, -mag, mag)
        return signed * torch.repeat_interleave(scale, self.block_size)[:numel]
