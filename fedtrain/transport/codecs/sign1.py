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
        """bf16 bits of each block's mean |x| (the mean over its real values), nearest.

        The sums must be the reference's: one ``(blocks, b)`` sum, each row summed on its own.
        torch splits a single-row sum of a long row over threads (another order), so with two
        or more blocks every sum here covers at least two rows; the padded last block is summed
        with the full row before it."""
        n, b = x.numel(), self.block_size
        nb = self._n_blocks(n)
        full = n // b
        sums = torch.empty(nb, dtype=torch.float32)
        rows = x[: full * b].view(full, b)
        tail = n - full * b
        # Rows [0, main) in chunks; rows [main, full) and the tail in one last group.
        main = full - (1 if tail and full else 0)
        if main == 1 and nb > 1:
            main = 0
        tmp = torch.empty(min(self._ROWS + 1, max(main, 1)), b, dtype=torch.float32)
        r = 0
        while r < main:
            e = min(r + self._ROWS, main)
            if main - e == 1:
                e = main  # never leave a chunk of one row
            t = tmp[: e - r] if e - r <= tmp.shape[0] else torch.empty(e - r, b)
            torch.abs(rows[r:e], out=t)
            torch.sum(t, dim=1, out=sums[r:e])
            r = e
        counts = torch.full((nb,), float(b))
        if main < nb:
            group = torch.zeros(nb - main, b, dtype=torch.float32)
            group[: full - main] = rows[main:]
            if tail:
                group[-1, :tail] = x[full * b :]
                counts[-1] = float(tail)
            sums[main:] = group.abs().sum(dim=1)
        mean_abs = sums / counts
        # Nearest bf16 (not ceil): contraction holds for any stored scale m̃ <= 2·m.
        return mean_abs.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF

    _kind = "sign1"
