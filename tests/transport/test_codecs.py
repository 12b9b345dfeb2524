"""Codec contract (every codec) and each codec's error bound (ALGORITHMS §3)."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrain.config import TransportSection
from fedtrain.transport import (
    CODECS,
    Payload,
    PayloadError,
    decode_payload,
    encode_payload,
    get_codec,
)
from fedtrain.transport.codecs import is_sparse
from fedtrain.transport.codecs.base import bf16_bits_to_float, ceil_to_bf16_bits
from fedtrain.transport.codecs.fp4 import E2M1_GRID

ALL = sorted(n for n, c in CODECS.items() if not getattr(c, "internal", False))


def _x(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------ contract
def run_contract(name: str) -> Payload:
    """What every codec must satisfy; a new codec is added to CODECS and passes this."""
    sparse = is_sparse(name)  # a chunk (power of two) and values kept per chunk
    keep = 4 if sparse else 0
    for block in (16, 64) if sparse else (1, 7, 64):
        codec = get_codec(name, block_size=block, keep=keep)
        for n in (0, 1, 63, 64, 65, 1001):
            x = _x(n, seed=n) * 3
            data = codec.encode(x)
            assert len(data) == codec.encoded_size(n), (name, block, n)
            y = codec.decode(data, n)
            assert y.shape == (n,) and y.dtype == torch.float32
            assert torch.isfinite(y).all()
    tensors = {"w": _x(6 * 7).reshape(6, 7), "odd": _x(5), "empty": torch.zeros(0, 3)}
    data = encode_payload(
        tensors,
        codec=name,
        kind="pseudo_grad",
        run_id="r",
        round=1,
        sender="s",
        block_size=32,
        keep=keep,
    )
    p = decode_payload(data)
    assert {k: v.shape for k, v in p.tensors.items()} == {k: v.shape for k, v in tensors.items()}
    header_len = int.from_bytes(data[4:8], "big")
    c32 = get_codec(name, block_size=32, keep=keep)
    body = sum(c32.encoded_size(t.numel()) for t in tensors.values())
    assert len(data) == 8 + header_len + body  # the payload is exactly what the header says
    with pytest.raises(PayloadError):
        decode_payload(data[:-1])
    corrupted = bytearray(data)
    corrupted[-1] ^= 0x10
    with pytest.raises(PayloadError, match="checksum"):
        decode_payload(bytes(corrupted))
    return p


@pytest.mark.parametrize("name", ALL)
def test_codec_contract(name):
    p = run_contract(name)
    assert p.codec == name and set(p.tensors) == {"w", "odd", "empty"}


def test_config_codec_names_match_the_registry():
    with pytest.raises(ValueError) as e:
        TransportSection(codec="nope")
    for name in ALL:
        assert repr(name) in str(e.value)
        TransportSection(codec=name, error_feedback=is_sparse(name))


@pytest.mark.parametrize(
    "name, bits",
    [
        ("fp32", 32),
        ("bf16", 16),
        ("int8", 8.25),
        ("int4", 4.25),
        ("fp4-e2m1", 4.25),
        ("sign1", 1.25),
    ],
)
def test_bits_per_value_include_the_block_scales(name, bits):
    n = 64 * 1000
    assert get_codec(name, block_size=64).encoded_size(n) * 8 / n == bits


# ---------------------------------------------------------------------------- bounds
def _stored_scales(x: torch.Tensor, block: int, divide: float = 1.0) -> torch.Tensor:
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % block)).view(-1, block)
    s = bf16_bits_to_float(ceil_to_bf16_bits(blocks.abs().amax(1) / divide))
    return torch.repeat_interleave(s, block)[: x.numel()]


def test_bf16_scale_is_rounded_up():
    a = _x(10_000).abs() * 1e3
    s = bf16_bits_to_float(ceil_to_bf16_bits(a))
    assert (s >= a).all() and (s <= a * (1 + 2**-7)).all()


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("name, levels", [("int8", 127), ("int4", 7)])
def test_absmax_elementwise_bound_and_grid(name, levels, block):
    # q = round(levels·x/a), x̂ = q·a/levels: |x − x̂| ≤ a/(2·levels) (a/254 int8, a/14 int4).
    x = _x(50_001, seed=levels, scale=5.0)
    y = get_codec(name, block_size=block).roundtrip(x)
    a = _stored_scales(x, block)
    assert ((x - y).abs() <= a / (2 * levels) * (1 + 1e-6)).all()
    q = y / (a / levels)
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= levels + 1e-3


def test_fp4_e2m1_bound_and_grid():
    x = _x(50_001, seed=2)
    y = get_codec("fp4-e2m1").roundtrip(x)
    s = _stored_scales(x, 64, divide=6.0)
    assert ((x - y).abs() <= 0.25 * torch.maximum(x.abs(), s) * (1 + 1e-6)).all()
    mags = (y.abs() / s).unique()
    assert all(torch.isclose(m, E2M1_GRID).any() for m in mags)


def test_sign1_is_l1_scaled_and_contracts():
    x = _x(64 * 50 + 3, seed=3)
    y = get_codec("sign1").roundtrip(x)
    assert torch.equal(torch.sign(y[x != 0]), torch.sign(x[x != 0]))
    first = x[:64].abs().mean()
    assert abs(y[0].abs().item() - first.item()) <= first.item() * 2**-8
    assert (x - y).norm() < x.norm()  # ℓ1 scaling always contracts


def test_measured_relative_errors_match_the_spec():
    x = _x(1_000_000, seed=4)
    rel = {
        n: ((x - get_codec(n).roundtrip(x)).norm() / x.norm()).item()
        for n in ("int8", "int4", "fp4-e2m1")
    }
    assert rel["int8"] == pytest.approx(0.006, abs=0.001)
    assert rel["fp4-e2m1"] == pytest.approx(0.10, abs=0.01)
    assert rel["int4"] == pytest.approx(0.11, abs=0.01)


def test_zeros_and_constant_blocks_round_trip_exactly():
    for name in ALL:
        codec = get_codec(name, keep=4 if is_sparse(name) else 0)
        assert torch.equal(codec.roundtrip(torch.zeros(130)), torch.zeros(130))


@pytest.mark.parametrize("name, levels", [("int8", 127.0), ("int4", 7.0)])
def test_stochastic_rounding_is_unbiased(name, levels):
    # One block with absmax 1 (stored scale exactly 1): value v lies between grid points
    # spaced 1/levels. Mean over K draws must be within 5·(step/2)/√K of v.
    k = 20_000
    values = torch.tensor([0.3141, -0.5, 0.0123, 0.77])
    x = torch.cat([torch.tensor([1.0]), values]).repeat(k)
    codec = get_codec(
        name, block_size=5, stochastic=True, generator=torch.Generator().manual_seed(0)
    )
    y = codec.roundtrip(x).view(k, 5)[:, 1:]
    step = 1.0 / levels
    tol = 5 * (step / 2) / math.sqrt(k)
    assert ((y.mean(0) - values).abs() <= tol).all()
    nearest = get_codec(name, block_size=5).roundtrip(x).view(k, 5)[:, 1:]
    assert ((nearest.mean(0) - values).abs() > tol).any()  # plain rounding is biased here


def test_fp4_stochastic_rounding_is_unbiased():
    k = 20_000
    values = torch.tensor([0.3, 2.5, -4.9, 0.01]) / 6  # scale = 1/6 from the absmax 1 below
    x = torch.cat([torch.tensor([1.0]), values]).repeat(k)
    codec = get_codec(
        "fp4-e2m1", block_size=5, stochastic=True, generator=torch.Generator().manual_seed(1)
    )
    y = codec.roundtrip(x).view(k, 5)[:, 1:]
    step = 2.0 / 6  # the widest grid gap, scaled
    assert ((y.mean(0) - values).abs() <= 5 * (step / 2) / math.sqrt(k)).all()
