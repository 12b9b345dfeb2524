"""The compiled codecs equal the torch reference bit for bit (tests/transport/codec_reference.py,
the implementation they replaced): the same body bytes for any tensor, the same decoded values
for any body — valid or hostile — and decode_add equal to decode then add.

One documented difference: a block of zeros stores scale +0. The reference stores +0 or −0
there depending on how torch's reductions happened to be vectorised (not a function of the
block: the same block gives either sign in different tensors), and both decode to zeros.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtrain.transport.codecs import get_codec, kernels
from tests.transport import codec_reference as ref

PAIRS = {
    "int8": ref.Int8Codec,
    "int4": ref.Int4Codec,
    "fp4-e2m1": ref.Fp4Codec,
    "sign1": ref.Sign1Codec,
}
BLOCKS = (1, 3, 7, 8, 64, 65, 256)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _positive_zero_scales(body: bytes, numel: int, block: int) -> bytes:
    """``body`` with every stored −0 scale as +0 (see the module's docstring)."""
    nb = -(-numel // block)
    out = bytearray(body)
    scales = np.frombuffer(out, dtype="<u2", count=nb).copy()
    scales[scales == 0x8000] = 0
    out[: 2 * nb] = scales.tobytes()
    return bytes(out)


def _values(kind: str, n: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """Tensors of the kinds that reach the edges of each codec."""
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).mul(12).exp()
    if kind == "zero blocks":  # whole blocks of +0 and −0, and lone −0 values
        for b in range(0, n, 3 * block):
            x[b : b + block] = 0.0
            x[b + block // 2 : b + block] = -0.0
        x[1::11] = -0.0
    elif kind == "tiny":  # subnormal blocks: an inverse scale that overflows (torch path)
        x[: 2 * block] *= 1e-44
        x[2 * block : 3 * block] = 1e-40
    elif kind == "huge":
        x[:block] = 3.3e38 * torch.sign(x[:block])
    elif kind == "non-finite":
        x[n // 2] = float("nan")
        x[n // 3] = float("inf")
    elif kind == "ties":  # exactly representable halves: round half to even
        x = torch.randint(-254, 255, (n,), generator=gen).float() / 2
    return x


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("kind", ["random", "zero blocks", "tiny", "huge", "non-finite", "ties"])
def test_bodies_and_decoded_values_equal_the_reference(name: str, kind: str) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{kind}".encode()))
    for block in BLOCKS:
        for n in (0, 1, 2, block - 1, block, block + 1, 5 * block + 3, 1001):
            if n < 0 or (kind != "random" and n < 3 * block):
                continue
            x = _values(kind, n, block, gen)
            ours, theirs = get_codec(name, block_size=block), PAIRS[name](block_size=block)
            body, expected = bytes(ours.encode(x)), theirs.encode(x)
            assert body in (expected, _positive_zero_scales(expected, n, block)), (block, n)
            for b in {body, expected}:
                got, want = ours.decode(b, n), theirs.decode(b, n)
                assert torch.equal(_bits(got), _bits(want)), (block, n)
                total = torch.randn(n, generator=gen)
                summed = total + want
                ours.decode_add(b, n, total)
                assert torch.equal(_bits(total), _bits(summed)), (block, n)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4-e2m1"])
def test_stochastic_rounding_equals_the_reference_for_a_seed(name: str) -> None:
    x = torch.randn(4099)
    a = get_codec(name, stochastic=True, generator=torch.Generator().manual_seed(3))
    b = PAIRS[name](stochastic=True, generator=torch.Generator().manual_seed(3))
    assert bytes(a.encode(x)) == b.encode(x)


def test_rows_split_over_threads_give_the_same_bytes(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_MIN_ROWS_PER_THREAD", 4)
    x = torch.randn(64 * 1000 + 17)
    single = {n: bytes(get_codec(n).encode(x)) for n in PAIRS}
    kernels.set_threads(2)
    try:
        for name, body in single.items():
            c = get_codec(name)
            assert bytes(c.encode(x)) == body
            assert torch.equal(
                _bits(c.decode(body, x.numel())), _bits(PAIRS[name]().decode(body, x.numel()))
            )
    finally:
        kernels.set_threads(1)


def test_decode_add_refuses_a_target_of_the_wrong_size_or_type() -> None:
    c = get_codec("int4")
    body = c.encode(torch.randn(100))
    with pytest.raises(ValueError, match="100 contiguous fp32"):
        c.decode_add(body, 100, torch.zeros(99))
    with pytest.raises(ValueError, match="100 contiguous fp32"):
        c.decode_add(body, 100, torch.zeros(100, dtype=torch.float64))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(PAIRS)),
    block=st.sampled_from(BLOCKS),
    numel=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_body_decodes_as_the_reference_decodes_it(
    name: str, block: int, numel: int, seed: int
) -> None:
    """Hostile bodies included: every bit pattern of scales (NaN, inf, subnormal, −0) and of
    codes (int4's unused code 0)."""
    ours = get_codec(name, block_size=block)
    size = ours.encoded_size(numel)
    body = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    got, want = ours.decode(body, numel), PAIRS[name](block_size=block).decode(body, numel)
    assert torch.equal(_bits(got), _bits(want))


def _on_bf16_midpoints(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with each block scaled so its mean |x| sits on a bf16 rounding midpoint: there a
    sum taken in another order rounds to another stored scale."""
    x = x.clone()
    for lo in range(0, x.numel(), b):
        block = x[lo : lo + b]
        m = (block.abs().sum() / block.numel()).item()
        bits = np.array([m], np.float32).view(np.uint32)[0]
        mid = float(np.uint32((bits & 0xFFFF0000) | 0x8000).view(np.float32))
        block.mul_(mid / m)
    return x


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_sign1_scales_of_long_blocks_equal_the_reference_with_threads(blocks: int) -> None:
    """torch sums one long row over threads but each row of a many-row sum on its own: with
    two threads and 65,536-value blocks, the sums (hence the bf16 scales) must still be the
    reference's, the padded last block's included."""
    b = 1 << 16
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in range(8):
            n = blocks * b - (5000 if seed % 2 else 0)
            x = _on_bf16_midpoints(torch.randn(n, generator=torch.Generator().manual_seed(seed)), b)
            ours, theirs = get_codec("sign1", block_size=b), ref.Sign1Codec(block_size=b)
            assert bytes(ours.encode(x)) == theirs.encode(x), (blocks, seed)
    finally:
        torch.set_num_threads(before)


def test_a_body_of_the_wrong_length_is_refused() -> None:
    for name in PAIRS:
        c = get_codec(name, block_size=3)
        size = c.encoded_size(100)
        for wrong in (0, size - 1, size + 1):
            with pytest.raises(ValueError, match="do not hold 100 values"):
                c.decode(bytes(wrong), 100)
    with pytest.raises(ValueError, match="require grad"):
        c.decode_add(c.encode(torch.randn(100)), 100, torch.zeros(100, requires_grad=True))
