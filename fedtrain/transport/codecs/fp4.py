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
)

__all__ = ["E2M1_GRID", "Fp4Codec"]

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
        body = self._encode_compiled(flat, "fp4")
        return self._encode_torch(flat) if body is None else body  # type: ignore[return-value]

    def _encode_torch(self, flat: torch.Tensor) -> bytes:
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

    _kind = "fp4"
