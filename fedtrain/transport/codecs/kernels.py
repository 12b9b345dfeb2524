"""Compiled loops for the blockwise codecs (numba): one pass per direction, no temporaries.

The torch formulation of each codec (kept in the tests as the reference) makes a full-size
temporary per step — |x|, x·inv, round, clamp, the integer cast, the nibble pairs — and every
fresh temporary page-faults. These loops read each value once and write its code (or value)
once, over ``(blocks, block_size)`` views so the inner loop has a fixed trip count and
vectorises; the per-block quantities (stored scale, inverse, decode factor) are computed by the
codecs with torch on the small per-block arrays, exactly as the reference does, so the bytes and
decoded values are bitwise the reference's (contract tests and the fuzz suite check it).

Blocks are independent: with :func:`set_threads` > 1 the rows are split over that many threads
(the loops release the GIL). Compiled on first use and cached next to this file (or in
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "E2M1_SIGNED",
    "INT4_VALUES",
    "encode_rows",
    "int8_decode_rows",
    "inverse_table",
    "nibbles_decode_flat",
    "nibbles_decode_rows",
    "rows",
    "Shared",
    "set_threads",
    "sign_bits",
    "sign1_decode_rows",
]

_QUARTER_TO_E2M1 = np.array(
    [0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7], dtype=np.uint8
)
E2M1_SIGNED = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
"""Value of each fp4 code (index | sign << 3) before the block scale."""
INT4_VALUES = np.arange(-8, 8, dtype=np.float32)
"""Value of each int4 code (code − 8) before the block factor."""

_INVERSES: dict[int, np.ndarray] = {}


def inverse_table(levels: int) -> np.ndarray:
    """``levels / s`` (0 where s <= 0) for every bf16 pattern s, in the reference's
    arithmetic: torch's ``levels / scale`` (a reciprocal times ``levels``), and for
    ``levels`` 1 its ``1.0 / scale`` (a plain division)."""
    table = _INVERSES.get(levels)
    if table is None:
        import torch

        scale = torch.from_numpy((np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32))
        num = 1.0 if levels == 1 else levels
        table = torch.where(scale > 0, num / scale, torch.zeros_like(scale)).numpy()
        _INVERSES[levels] = table
    return table


def _compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``njit`` with its machine code cached on disk, or compiled in each process where numba
    finds no writable cache location (a read-only install without ``NUMBA_CACHE_DIR``)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return njit(cache=True, nogil=True, boundscheck=False, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, nogil=True, boundscheck=False, **options)(fn)

    return wrap


_jit = _compiled()
_inline = _compiled(inline="always")

_threads = 1
_pool: ThreadPoolExecutor | None = None
_MIN_ROWS_PER_THREAD = 1 << 14


def set_threads(n: int) -> None:
    """Threads the row loops are split over (1: the calling thread only)."""
    global _threads, _pool
    _threads = max(1, int(n))
    if _pool is not None:
        _pool.shutdown()
        _pool = None


class Shared:
    """An argument of :func:`rows` that every thread gets whole (a table), not a slice."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def rows(fn: Callable[..., Any], n_rows: int, *args: Any) -> int:
    """``fn(*args)``, its rows split over the threads: every array argument's first axis is
    the rows, except :class:`Shared` ones; scalars pass as they are. The sum of what the calls
    return (ints; None counts 0)."""
    parts = min(_threads, max(1, n_rows // _MIN_ROWS_PER_THREAD))
    if parts <= 1:
        return int(fn(*(a.value if isinstance(a, Shared) else a for a in args)) or 0)
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads, thread_name_prefix="codec")
    cuts = [n_rows * k // parts for k in range(parts + 1)]
    futures = [
        _pool.submit(fn, *(_part(a, lo, hi) for a in args))
        for lo, hi in zip(cuts, cuts[1:], strict=False)
    ]
    return sum(int(f.result() or 0) for f in futures)


def _part(a: Any, lo: int, hi: int) -> Any:
    if isinstance(a, Shared):
        return a.value
    return a[lo:hi] if isinstance(a, np.ndarray) else a


@_jit
def encode_rows(x, xu, inv_of, div6, bits, out, kind):  # type: ignore[no-untyped-def]
    """Each row (block) of ``x`` in one pass: its max |x| (from the fp32 bits ``xu``: the order
    of magnitudes is the order of their bits), the stored scale's bf16 bits rounded up
    (``bits[b]``; of max/6 when ``div6``), its inverse ``inv_of[bits]`` (a table over all 65,536
    bf16 patterns, made with the reference's arithmetic), then the codes into ``out``: kind 0
    int8 (one per value), 1 int4, 2 fp4 (two per byte, low nibble first; even block size).

    Returns the number of rows the reference treats otherwise (a NaN or an infinity in the
    row, or an infinite inverse): the caller then encodes with the torch path."""
    bad = 0
    one = np.empty(1, dtype=np.uint32)
    as_float = one.view(np.float32)
    for b in range(x.shape[0]):
        m = np.uint32(0)
        for k in range(x.shape[1]):
            m = max(m, xu[b, k] & np.uint32(0x7FFFFFFF))
        if m >= np.uint32(0x7F800000):
            bad += 1
            continue
        if div6:
            one[0] = m
            as_float[0] = as_float[0] / np.float32(6.0)
            m = one[0]
        up = (m + np.uint32(0xFFFF)) >> np.uint32(16)
        bits[b] = np.uint16(up)
        s = inv_of[up]
        if s == np.inf and kind != 2:
            bad += 1
            continue
        if kind == 0:
            for k in range(x.shape[1]):
                q = np.rint(x[b, k] * s)
                out[b, k] = np.int8(min(max(q, np.float32(-127.0)), np.float32(127.0)))
        else:
            fp4 = kind == 2
            for k in range(out.shape[1]):
                lo = _code(x[b, 2 * k], s, fp4)
                hi = _code(x[b, 2 * k + 1], s, fp4)
                out[b, k] = lo | (hi << 4)
    return bad


@_jit
def int8_decode_rows(q, factor, out, add):  # type: ignore[no-untyped-def]
    """``out[b, k]`` (=, or += when ``add``) q[b, k]·factor[b], the product rounded to fp32."""
    for b in range(q.shape[0]):
        f = factor[b]
        if add:
            for k in range(q.shape[1]):
                out[b, k] += np.float32(q[b, k]) * f
        else:
            for k in range(q.shape[1]):
                out[b, k] = np.float32(q[b, k]) * f


@_inline
def _code(v, s, fp4):  # type: ignore[no-untyped-def]
    """The 4-bit code of value ``v`` at inverse scale ``s``: int4 rint(v·s) + 8 in 1..15, or
    the fp4 grid index of |v·s| (nearest, by quarter steps) | sign << 3."""
    p = v * s
    if fp4:
        a = abs(p)
        t = np.int32(0)
        if a == a:  # NaN (0·inf) takes index 0, as the reference's nan_to_num
            t = np.int32(min(a, np.float32(6.0)) * np.float32(4.0))
        code = _QUARTER_TO_E2M1[t]
        if v < 0:
            code |= np.uint8(8)
        return code
    q = np.rint(p)
    return np.uint8(np.int32(min(max(q, np.float32(-7.0)), np.float32(7.0))) + 8)


@_jit
def nibbles_decode_rows(packed, table, factor, out, add):  # type: ignore[no-untyped-def]
    """``out[b, 2k + j]`` (=, or +=) table[nibble j of packed[b, k]]·factor[b]."""
    for b in range(packed.shape[0]):
        f = factor[b]
        if add:
            for k in range(packed.shape[1]):
                byte = packed[b, k]
                out[b, 2 * k] += table[byte & 15] * f
                out[b, 2 * k + 1] += table[byte >> 4] * f
        else:
            for k in range(packed.shape[1]):
                byte = packed[b, k]
                out[b, 2 * k] = table[byte & 15] * f
                out[b, 2 * k + 1] = table[byte >> 4] * f


@_jit
def nibbles_decode_flat(packed, block, table, factor, out, add):  # type: ignore[no-untyped-def]
    for i in range(out.size):
        v = table[(packed[i >> 1] >> ((i & 1) << 2)) & 15] * factor[i // block]
        if add:
            out[i] += v
        else:
            out[i] = v


@_jit
def sign_bits(x, out):  # type: ignore[no-untyped-def]
    """Bit i of the little-endian bit string ``out`` is set where x[i] < 0."""
    n = x.size
    full = n // 8
    for p in range(full):
        byte = np.uint8(0)
        for k in range(8):
            if x[8 * p + k] < 0:
                byte |= np.uint8(1 << k)
        out[p] = byte
    if n > 8 * full:
        byte = np.uint8(0)
        for k in range(n - 8 * full):
            if x[8 * full + k] < 0:
                byte |= np.uint8(1 << k)
        out[full] = byte


@_jit
def sign1_decode_rows(bits, scale, out, add):  # type: ignore[no-untyped-def]
    """Rows of a block size that is a multiple of 8: ``out[b, k]`` (=, or +=) −scale[b] where
    bit k of row b is set, else +scale[b]."""
    for b in range(out.shape[0]):
        m = scale[b]
        for k in range(out.shape[1]):
            v = -m if (bits[b, k >> 3] >> (k & 7)) & 1 else m
            if add:
                out[b, k] += v
            else:
                out[b, k] = v


@_jit
def sign1_decode_flat(bits, block, scale, out, add):  # type: ignore[no-untyped-def]
    """``out[i]`` (=, or +=) −scale[block] where bit i is set, else +scale[block]."""
    n = out.size
    for b in range(scale.size):
        m = scale[b]
        lo = b * block
        hi = min(lo + block, n)
        for i in range(lo, hi):
            v = -m if (bits[i >> 3] >> (i & 7)) & 1 else m
            if add:
                out[i] += v
            else:
                out[i] = v
