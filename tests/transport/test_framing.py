"""Payloads written tensor by tensor, and read lazily: the same bytes and values as eagerly."""

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.transport import get_codec
from fedtrain.transport.framing import PayloadWriter
from fedtrain.transport.payload import LazyTensors, decode_payload, encode_payload

CODECS = ["fp32", "bf16", "int8", "int4", "fp4-e2m1", "sign1"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(100, 7, generator=g), "a": torch.randn(33, generator=g)}


def _kw(codec: str, key=None) -> dict:
    return dict(
        codec=codec, kind="update", run_id="r", round=3, sender="s", meta={"k": 1}, signing_key=key
    )


@pytest.mark.parametrize("codec", CODECS)
def test_writer_fill_gives_encode_payloads_bytes(codec):
    t = _tensors()
    key = Ed25519PrivateKey.generate()
    whole = encode_payload(t, **_kw(codec, key))
    writer = PayloadWriter(t, **_kw(codec, key))
    c = get_codec(codec)
    for n in writer.names:  # pre-encoded bodies, as a relay or the scale bench has them
        writer.fill(n, c.encode(t[n].reshape(-1)))
    assert bytes(writer.finish()) == whole
    p = decode_payload(whole, public_key=key.public_key())
    assert p.signed and set(p.tensors) == set(t)


def test_writer_refuses_wrong_order_size_and_incomplete():
    t = _tensors()
    w = PayloadWriter(t, **_kw("int4"))
    with pytest.raises(ValueError, match="name order: expected 'a'"):
        w.write("b.w", t["b.w"])
    with pytest.raises(ValueError, match="encoded bytes"):
        w.fill("a", b"\x00")
    w.write("a", t["a"])
    with pytest.raises(ValueError, match="incomplete: b.w"):
        w.finish()


@pytest.mark.parametrize("codec", CODECS)
def test_lazy_tensors_equal_eager_and_scale_in_order(codec):
    data = encode_payload(_tensors(), **_kw(codec))
    eager, lazy = decode_payload(data).tensors, decode_payload(data, lazy=True)
    assert isinstance(lazy.tensors, LazyTensors) and lazy.numel == 733
    for n, t in eager.items():
        assert lazy.tensors.shape_of(n) == tuple(t.shape)
        assert torch.equal(lazy.tensors[n], t)
        assert lazy.tensors.all_finite(n)
    twice = lazy.tensors.scaled(0.3).scaled(1.7)
    for n, t in eager.items():
        assert torch.equal(twice[n], t * 0.3 * 1.7)


def _int4_with_scale(bits: int) -> tuple[bytes, int]:
    """An int4 body of one 64-value block whose bf16 scale has the given bit pattern."""
    c = get_codec("int4")
    body = bytearray(c.encode(torch.linspace(-1, 1, 64)))
    body[0:2] = int(bits).to_bytes(2, "little")
    return bytes(body), 64


@pytest.mark.parametrize("codec", ["int8", "int4", "fp4-e2m1", "sign1", "fp32", "bf16"])
def test_all_finite_agrees_with_decoding_for_hostile_bodies(codec):
    c = get_codec(codec)
    rng = np.random.default_rng(1)
    good = c.encode(torch.randn(200))
    for _ in range(300):
        body = bytearray(good)
        for pos in rng.integers(0, len(body), size=3):  # random bytes: scales, values, NaN/inf
            body[pos] = int(rng.integers(0, 256))
        decoded_finite = bool(torch.isfinite(c.decode(bytes(body), 200)).all())
        assert c.all_finite(bytes(body), 200) == decoded_finite


def test_all_finite_catches_overflow_from_a_huge_finite_scale():
    # int4 code -8 times a 3.39e38 scale / 7 overflows to -inf although the scale is finite.
    body, n = _int4_with_scale(0x7F7F)  # largest finite bf16
    c = get_codec("int4")
    assert math.isfinite(torch.tensor([0x7F7F], dtype=torch.int16).view(torch.bfloat16).item())
    assert c.all_finite(body, n) == bool(torch.isfinite(c.decode(body, n)).all())
    nan_body, _ = _int4_with_scale(0x7FC0)
    assert not c.all_finite(nan_body, n)
