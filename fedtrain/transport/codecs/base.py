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
    "pack_nibbles",
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

    def decode_add(self, data: bytes | memoryview, numel: int, out: torch.Tensor) -> None:
        """``out += decode(data, numel)`` (``out``: ``numel`` fp32 values)."""
        out.add_(self.decode(data, numel).view_as(out))

    def roundtrip(self, flat: torch.Tensor) -> torch.Tensor:
        """``decode(encode(flat))``: what the receiver will see."""
        return self.decode(self.encode(flat), flat.numel())

    def all_finite(self, data: bytes | memoryview, numel: int) -> bool:
        """Whether every value :meth:`decode` gives is finite (by default: decode and look)."""
        return bool(torch.isfinite(self.decode(data, numel)).all())

    def malformed(self, data: bytes | memoryview, numel: int) -> str | None:
        """Why a correctly sized body is still not one this codec writes (None: it is). Dense
        codecs decode any bytes of the right size."""
        return None


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


_BF16_1E38 = 0x7E96
"""bf16 bits (sign cleared) of the largest bf16 <= 1e38."""


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

    # --- the compiled path (kernels.py): one pass per direction ---------------------------

    @staticmethod
    def _f32(flat: torch.Tensor) -> np.ndarray:
        """``flat`` as a contiguous fp32 array (no copy when it already is one)."""
        return flat.detach().reshape(-1).to(torch.float32).contiguous().numpy()

    def _pad(self, seg: np.ndarray) -> np.ndarray:
        """``seg`` (the values of a last, partial block) as one zero-padded row."""
        row = np.zeros((1, self.block_size), dtype=seg.dtype)
        row[0, : seg.size] = seg
        return row

    _KINDS = {"int8": (0, 127), "int4": (1, 7), "fp4": (2, 1)}

    def _encode_compiled(self, flat: torch.Tensor, kind: str) -> memoryview | None:
        """The body of ``flat`` from the compiled kernel (``kind`` "int8", "int4" or "fp4"),
        or None where the torch path encodes instead: stochastic rounding, a 4-bit codec with
        an odd block size, a block holding a NaN or an infinity (its stored scale carries it)
        or one so small that x·inverse would overflow."""
        from fedtrain.transport.codecs import kernels as k

        code, levels = self._KINDS[kind]
        b = self.block_size
        if self.stochastic or (code and b % 2):
            return None
        x = self._f32(flat)
        n = x.size
        nb, full = self._n_blocks(n), n // b
        tail = n - full * b
        buf = np.empty(self.encoded_size(n), dtype=np.uint8)  # every byte is written
        bits = buf[: 2 * nb].view("<u2")
        values = buf[2 * nb :]
        per = b if code == 0 else b // 2
        vals = values.view(np.int8) if code == 0 else values
        inv = k.inverse_table(levels)
        main = x[: full * b].reshape(full, b)
        codes = vals[: full * per].reshape(full, per)
        bad = k.rows(
            k.encode_rows, full, main, main.view(np.uint32), k.Shared(inv), code == 2,
            bits[:full], codes, code,
        )  # fmt: skip
        if tail:
            row = self._pad(x[full * b :])
            last = np.empty((1, per), dtype=vals.dtype)
            bad += k.encode_rows(row, row.view(np.uint32), inv, code == 2, bits[full:], last, code)
            vals[full * per :] = last[0, : tail if code == 0 else (tail + 1) // 2]
            if code and tail % 2:
                values[-1] &= 0x0F  # as pack_nibbles: an odd count's last high nibble is 0
        return None if bad else buf.data

    def _kernel_decode(
        self, values: np.ndarray, factor: np.ndarray, target: np.ndarray, add: bool, kind: str
    ) -> None:
        """Decode ``values`` (the body's value bytes) times the per-block ``factor`` into
        ``target`` (=, or += when ``add``): ``kind`` "int8", "int4", "fp4" or "sign1"."""
        from fedtrain.transport.codecs import kernels as k

        b, n = self.block_size, target.size
        full, tail = n // b, n - n // b * b
        out = target[: full * b].reshape(full, b)
        last = self._pad(target[full * b :]) if add else np.empty((1, b), dtype=np.float32)
        if kind == "int8":
            q = values.view(np.int8)
            k.rows(
                k.int8_decode_rows, full, q[: full * b].reshape(full, b), factor[:full], out, add
            )
            if tail:
                k.int8_decode_rows(self._pad(q[full * b :]), factor[full:], last, add)
        elif kind == "sign1":
            if b % 8:
                k.sign1_decode_flat(values, b, factor, target, add)
                return
            w = b // 8
            k.rows(
                k.sign1_decode_rows,
                full,
                values[: full * w].reshape(full, w),
                factor[:full],
                out,
                add,
            )
            if tail:
                bits = np.zeros((1, w), dtype=np.uint8)
                bits[0, : values.size - full * w] = values[full * w :]
                k.sign1_decode_rows(bits, factor[full:], last, add)
        else:
            table = k.INT4_VALUES if kind == "int4" else k.E2M1_SIGNED
            if b % 2:
                k.nibbles_decode_flat(values, b, table, factor, target, add)
                return
            h = b // 2
            packed = values[: full * h].reshape(full, h)
            k.rows(k.nibbles_decode_rows, full, packed, k.Shared(table), factor[:full], out, add)
            if tail:
                row = np.zeros((1, h), dtype=np.uint8)
                row[0, : values.size - full * h] = values[full * h :]
                k.nibbles_decode_rows(row, table, factor[full:], last, add)
        if tail:
            target[full * b :] = last[0, :tail]

    def _decode_prep(
        self, data: bytes | memoryview, numel: int, out: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored scales (fp32), the value bytes (uint8) and the fp32 array decoded into
        (``out``'s own memory when given: 1-D, fp32, contiguous, ``numel`` values)."""
        nb = self._n_blocks(numel)
        mv = memoryview(data).cast("B")
        if len(mv) != self.encoded_size(numel):
            raise ValueError(
                f"{self.name}: {len(mv)} bytes do not hold {numel} values "
                f"({self.encoded_size(numel)} expected)"
            )
        stored = np.frombuffer(mv[: 2 * nb], dtype="<u2")
        scale = (stored.astype(np.uint32) << 16).view(np.float32)
        rest = mv[2 * nb :]
        if out is None:
            target = np.empty(numel, dtype=np.float32)
        else:
            if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != numel:
                raise ValueError(f"decode target must be {numel} contiguous fp32 values")
            if out.requires_grad:
                raise ValueError("decode target must not require grad (it is written in place)")
            target = out.detach().view(-1).numpy()
        return scale, np.frombuffer(rest, dtype=np.uint8), target

    _kind = ""
    """What :meth:`_kernel_decode` decodes: "int8", "int4", "fp4" or "sign1"."""

    def _factor(self, scale: np.ndarray) -> np.ndarray:
        """Per-block factor the codes' values are multiplied by, from the stored scales."""
        return scale

    def all_finite(self, data: bytes | memoryview, numel: int) -> bool:
        """From the scales alone when they are finite and at most 1e38: every code's value is
        at most 8/7 of its block's scale, so no decoded value can overflow; otherwise decode."""
        nb = self._n_blocks(numel)
        if numel == 0 or len(data) != self.encoded_size(numel):
            return super().all_finite(data, numel)
        stored = np.frombuffer(memoryview(data).cast("B")[: 2 * nb], dtype="<u2")
        # bf16 bits: exponent field below 0xFE (|x| < 2^127 ~ 1.7e38) and not all ones (inf/NaN)
        if int((stored & 0x7FFF).max()) <= _BF16_1E38:
            return True
        return super().all_finite(data, numel)

    def decode(self, data: bytes | memoryview, numel: int) -> torch.Tensor:
        return self._decode(data, numel, None)

    def decode_add(self, data: bytes | memoryview, numel: int, out: torch.Tensor) -> None:
        """``out += decode(data, numel)`` without a decoded temporary (each decoded value is
        rounded to fp32, then added)."""
        self._decode(data, numel, out)

    def _decode(
        self, data: bytes | memoryview, numel: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        scale, values, target = self._decode_prep(data, numel, out)
        with np.errstate(all="ignore"):  # a hostile NaN/inf scale decodes non-finite
            factor = self._factor(scale)
        self._kernel_decode(values, factor, target, out is not None, self._kind)
        return torch.from_numpy(target) if out is None else out

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        """Round to integers: nearest, or stochastically (unbiased: E[round(v)] = v)."""
        if not self.stochastic:
            return torch.round(v)
        u = torch.rand(v.shape, generator=self.generator)
        return torch.floor(v + u)
