"""One-bit sign with an ℓ1 scale per block: c = (‖x‖₁/d)·sign(x) (Bernstein et al., signSGD).

The ℓ1 scale always contracts (‖x − c‖² = ‖x‖² − d·m² ≤ ‖x‖²), which error feedback needs;
an ℓ2 scale does not. Zero maps to +m. 1 bit per value + 16 bits per block.
"""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import BlockCodec, pack_bits, unpack_bits

__all__ = ["Sign1Codec"]


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
