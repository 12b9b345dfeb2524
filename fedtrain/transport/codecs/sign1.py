"""One-bit sign with an ℓ1 scale per block: c = (‖x‖₁/d)·sign(x) (Bernstein et al., signSGD).

The ℓ1 scale always contracts (‖x − c‖² = ‖x‖² − d·m² ≤ ‖x‖²), which error feedback needs;
an ℓ2 scale does not. Zero maps to +m. 1 bit per value + 16 bits per block.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.transport.codecs.base import BlockCodec

__all__ = ["Sign1Codec"]


class Sign1Codec(BlockCodec):
    name = "sign1"
    bits_per_value = 1.0

    def encode(self, flat: torch.Tensor) -> bytes:
        from fedtrain.transport.codecs import kernels

        x = self._f32(flat)
        bits = self._scale_bits(torch.from_numpy(x))
        nb = bits.numel()
        buf = np.empty(self.encoded_size(x.size), dtype=np.uint8)  # every byte is written
        buf[: 2 * nb].view("<u2")[:] = bits.numpy()
        kernels.sign_bits(x, buf[2 * nb :])
        return buf.data  # type: ignore[return-value]

    _ROWS = 1 << 14
    """Blocks whose ℓ1 norms are taken at once (a small |x| temporary, reused)."""

    def _scale_bits(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 bits of each block's mean |x| (the mean over its real values), nearest."""
        n, b = x.numel(), self.block_size
        nb = self._n_blocks(n)
        full = n // b
        sums = torch.empty(nb, dtype=torch.float32)
        rows = x[: full * b].view(full, b)
        tmp = torch.empty(min(self._ROWS, max(full, 1)), b)
        for r in range(0, full, self._ROWS):
            part = rows[r : r + self._ROWS]
            t = tmp[: part.shape[0]]
            torch.abs(part, out=t)
            torch.sum(t, dim=1, out=sums[r : r + part.shape[0]])
        counts = torch.full((nb,), float(b))
        if nb > full:  # the padded last block: summed padded, as a full row
            last = torch.zeros(1, b)
            last[0, : n - full * b] = x[full * b :]
            sums[full:] = last.abs().sum(dim=1)
            counts[-1] = float(n - full * b)
        mean_abs = sums / counts
        # Nearest bf16 (not ceil): contraction holds for any stored scale m̃ <= 2·m.
        return mean_abs.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF

    _kind = "sign1"
