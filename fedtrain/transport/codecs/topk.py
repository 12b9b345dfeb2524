"""Sparse top-k per chunk with 2- or 4-bit values (SparseLoCo, Sarfi et al. 2025).

The tensor is cut into chunks of C values (``transport.chunk``, a power of two; the last one
padded with zeros for the arithmetic only). Each chunk keeps its k largest magnitudes
(``transport.density`` · C), quantised uniformly on [−a, a] with 2^b levels, a = the largest
kept magnitude stored as a bf16 rounded up; the in-chunk indices are bit-packed at log2 C bits
each, ascending. Everything off the kept set decodes to exactly 0, so the error-feedback
residual x − x̂ holds the rest for the next round (error feedback is required).

A chunk is ``2 + ⌈k·log2 C / 8⌉ + ⌈k·b / 8⌉`` bytes: at C = 4096, k = 64, b = 2 that is 114
bytes per 4096 values, 0.22 bits per value, 144x fewer than fp32. A bitmap would be smaller than
the indices only above 1/log2 C density (8% at C = 4096), where int4 is the better codec anyway.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedtrain.transport.codecs.base import (
    Codec,
    bf16_bits_to_float,
    ceil_to_bf16_bits,
)

__all__ = ["TopK2Codec", "TopK4Codec", "TopKCodec"]

_SLAB_VALUES = 1 << 22
"""Values (whole chunks) encoded or decoded at a time: bounded temporaries (~100 MB)."""
MAX_CHUNK = 1 << 16
"""Largest chunk a payload may claim (the config's range)."""


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of unsigned codes (< 2^bits) into little-endian bit strings, one row each."""
    shifts = np.arange(bits, dtype=np.int64)
    flat = ((codes[..., None].astype(np.int64) >> shifts) & 1).astype(np.uint8)
    return np.packbits(flat.reshape(codes.shape[0], -1), axis=1, bitorder="little")


def _unpack(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack`: ``count`` codes of ``bits`` bits per row (int64), one bit
    plane at a time (no int64 copy of every bit)."""
    flat = np.unpackbits(packed, axis=1, count=count * bits, bitorder="little")
    planes = flat.reshape(packed.shape[0], count, bits)
    out = np.zeros((packed.shape[0], count), dtype=np.int64)
    for j in range(bits):
        out |= planes[:, :, j].astype(np.int64) << j
    return out


class TopKCodec(Codec):
    """Top-k magnitudes per chunk of ``block_size`` values, ``value_bits`` bits each."""

    value_bits = 2
    sparse = True
    """Takes ``keep`` (k per chunk) and needs error feedback."""

    def __init__(
        self,
        block_size: int = 4096,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        keep: int = 64,
    ) -> None:
        super().__init__(block_size, stochastic, generator)
        if not 2 <= block_size <= MAX_CHUNK or block_size & (block_size - 1):
            raise ValueError(
                f"{self.name}: chunk must be a power of two in [2, {MAX_CHUNK}], got {block_size}"
            )
        self.index_bits = block_size.bit_length() - 1
        most = block_size // self.index_bits + 1  # the config's density bound, rounded up
        if not 1 <= keep <= most:
            raise ValueError(f"{self.name}: keep must be in [1, {most}], got {keep}")
        self.keep = keep
        self.steps = (1 << self.value_bits) - 1
        self._idx_bytes = math.ceil(keep * self.index_bits / 8)
        self._val_bytes = math.ceil(keep * self.value_bits / 8)
        self._chunk_bytes = 2 + self._idx_bytes + self._val_bytes
        self.bits_per_value = 8 * self._chunk_bytes / block_size

    def _n_chunks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def encoded_size(self, numel: int) -> int:
        return self._n_chunks(numel) * self._chunk_bytes

    def _rows(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Chunks [lo, hi) of flat ``x`` as ``(hi − lo, C)`` rows, the last one zero-padded."""
        c = self.block_size
        part = x[lo * c : hi * c]
        pad = (hi - lo) * c - part.numel()
        if pad:
            part = torch.cat([part, part.new_zeros(pad)])
        return part.view(hi - lo, c)

    def encode(self, flat: torch.Tensor) -> bytes:
        x = flat.detach().reshape(-1).to(torch.float32)
        nc = self._n_chunks(x.numel())
        buf = np.empty((nc, self._chunk_bytes), dtype=np.uint8)
        slab = max(1, _SLAB_VALUES // self.block_size)
        for lo in range(0, nc, slab):
            hi = min(lo + slab, nc)
            rows = self._rows(x, lo, hi)
            idx = torch.topk(rows.abs(), self.keep, dim=1, sorted=False).indices
            idx = idx.sort(dim=1).values
            vals = rows.gather(1, idx)
            bits = ceil_to_bf16_bits(vals.abs().amax(dim=1))
            scale = bf16_bits_to_float(bits)
            inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
            y = (vals * inv[:, None]).clamp_(-1.0, 1.0).add_(1.0).mul_(self.steps / 2)
            if self.stochastic:
                q = torch.floor(y + torch.rand(y.shape, generator=self.generator))
            else:
                q = torch.round(y)
            codes = q.clamp_(0, self.steps).to(torch.int64).numpy()
            out = buf[lo:hi]
            out[:, :2] = bits.numpy().astype("<u2").view(np.uint8).reshape(-1, 2)
            out[:, 2 : 2 + self._idx_bytes] = _pack(idx.numpy(), self.index_bits)
            out[:, 2 + self._idx_bytes :] = _pack(codes, self.value_bits)
        return buf.reshape(-1).data  # type: ignore[return-value]

    def _parts(self, data: bytes | memoryview, numel: int) -> np.ndarray:
        mv = memoryview(data).cast("B")
        if len(mv) != self.encoded_size(numel):
            raise ValueError(
                f"{self.name}: {len(mv)} bytes do not hold {numel} values "
                f"({self.encoded_size(numel)} expected)"
            )
        return np.frombuffer(mv, dtype=np.uint8).reshape(-1, self._chunk_bytes)

    def _slab(self, chunks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """In-chunk indices and decoded values of some chunks."""
        bits = torch.from_numpy(chunks[:, :2].copy().view("<u2").astype(np.int32).reshape(-1))
        scale = bf16_bits_to_float(bits)
        idx = _unpack(chunks[:, 2 : 2 + self._idx_bytes], self.keep, self.index_bits)
        q = _unpack(chunks[:, 2 + self._idx_bytes :], self.keep, self.value_bits)
        level = torch.from_numpy(q).to(torch.float32).mul_(2.0 / self.steps).sub_(1.0)
        return torch.from_numpy(idx), level.mul_(scale[:, None])

    def _decode(self, data: bytes | memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        chunks = self._parts(data, numel)
        c, nc = self.block_size, chunks.shape[0]
        full = numel // c
        slab = max(1, _SLAB_VALUES // c)
        with np.errstate(all="ignore"):
            for lo in range(0, nc, slab):
                hi = min(lo + slab, nc)
                idx, vals = self._slab(chunks[lo:hi])
                end = min(hi, full)
                if end > lo:  # whole chunks: straight into the target
                    out[lo * c : end * c].view(end - lo, c).scatter_add_(
                        1, idx[: end - lo], vals[: end - lo]
                    )
                if hi > full:  # the padded last chunk
                    row = torch.zeros(c, dtype=torch.float32)
                    row.scatter_add_(0, idx[-1], vals[-1])
                    out[full * c :] += row[: numel - full * c]
        return out

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        self._parts(data, numel)  # the size check, before allocating
        try:
            out = torch.zeros(numel, dtype=torch.float32)
        except (RuntimeError, MemoryError):  # a count a few bytes can claim (~10^4 per byte)
            raise ValueError(f"{self.name}: cannot allocate {numel} values") from None
        return self._decode(data, numel, out)

    def decode_add(self, data: bytes | memoryview, numel: int, out: torch.Tensor) -> None:
        """``out += decode(data, numel)``: only the kept values are touched."""
        if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != numel:
            raise ValueError(f"decode target must be {numel} contiguous fp32 values")
        with torch.no_grad():
            self._decode(data, numel, out.detach().view(-1))

    def all_finite(self, data: bytes | memoryview, numel: int) -> bool:
        """From the scales when keep × each is finite (a decoded value is at most a, and
        :meth:`malformed` refuses repeated indices); else decode and look."""
        if numel == 0 or len(data) != self.encoded_size(numel):
            return super().all_finite(data, numel)
        stored = self._parts(data, numel)[:, :2].copy().view("<u2")
        top = float(bf16_bits_to_float(torch.tensor([int((stored & 0x7FFF).max())])))
        if top * self.keep <= 1e38:
            return True
        return super().all_finite(data, numel)

    def malformed(self, data: bytes | memoryview, numel: int) -> str | None:
        """Indices must be strictly ascending in each chunk (as :meth:`encode` writes them): a
        repeated index would add up kept values past their bound."""
        if numel == 0 or len(data) != self.encoded_size(numel):
            return None  # the size check elsewhere names it
        chunks = self._parts(data, numel)
        slab = max(1, _SLAB_VALUES // self.block_size)
        for lo in range(0, chunks.shape[0], slab):
            part = chunks[lo : lo + slab, 2 : 2 + self._idx_bytes]
            idx = _unpack(part, self.keep, self.index_bits)
            bad = np.flatnonzero((np.diff(idx, axis=1) <= 0).any(axis=1))
            if bad.size:
                return f"sparse indices not strictly ascending in chunk {lo + int(bad[0])}"
        return None


class TopK2Codec(TopKCodec):
    name = "topk-int2"
    value_bits = 2


class TopK4Codec(TopKCodec):
    name = "topk-int4"
    value_bits = 4
