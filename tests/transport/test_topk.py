"""Sparse top-k codecs: what is kept, what is exact, what the bytes are (SparseLoCo)."""

from __future__ import annotations

import pytest
import torch

from fedtrain.config import TransportSection
from fedtrain.config.errors import ConfigError
from fedtrain.transport import decode_payload, encode_payload, get_codec
from fedtrain.transport.feedback import ErrorFeedback

SPARSE = ("topk-int2", "topk-int4")


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SPARSE)
def test_kept_set_is_the_top_k_and_everything_else_is_exactly_zero(name):
    chunk, keep = 256, 8
    codec = get_codec(name, block_size=chunk, keep=keep)
    x = _x(10 * chunk + 37)
    y = codec.roundtrip(x)
    for i in range(0, x.numel(), chunk):
        xs, ys = x[i : i + chunk], y[i : i + chunk]
        top = set(xs.abs().topk(min(keep, xs.numel())).indices.tolist())
        kept = set(ys.nonzero().flatten().tolist())
        assert kept <= top  # a kept value may round to 0 only at a = 0; never off the set
        a = float(xs.abs().max())
        err = (ys - xs)[list(top)].abs().max()
        assert float(err) <= a / codec.steps * (1 + 2**-7) + 1e-7  # stored scale: bf16, up
    assert int((y[x.numel() - 37 :] != 0).sum()) <= keep  # the padded last chunk too


@pytest.mark.parametrize("name", SPARSE)
def test_error_feedback_residual_is_what_was_not_sent(name):
    codec = get_codec(name, block_size=64, keep=4)
    x = {"w": _x(64 * 5).reshape(5, 64)}
    ef = ErrorFeedback()
    sent = {"w": codec.roundtrip(x["w"].reshape(-1)).reshape(5, 64)}
    ef.stage(ef.compensate(x), sent)
    ef.commit()
    assert torch.equal(ef.residual["w"], x["w"] - sent["w"])
    # Off the kept set, the residual is the whole value.
    off = sent["w"] == 0
    assert torch.equal(ef.residual["w"][off], x["w"][off])


def test_default_config_is_about_146x_smaller_than_fp32_payload_bytes_included():
    t = TransportSection(codec="topk-int2", error_feedback=True)
    assert (t.chunk, t.keep) == (4096, 64)
    tensors = {"w": _x(4096 * 512).reshape(512, 4096), "b": _x(4096)}
    data = encode_payload(
        tensors, codec=t.codec, kind="pseudo_grad", run_id="r", round=1, sender="s",
        **t.codec_args(),
    )  # fmt: skip
    fp32 = 4 * sum(v.numel() for v in tensors.values())
    assert 140 < fp32 / len(data) < 146  # 114 bytes per 4096 values, plus the header
    p = decode_payload(data)
    assert p.keep == 64 and p.block_size == 4096
    want = get_codec("topk-int2", block_size=4096, keep=64).roundtrip(tensors["b"])
    assert torch.equal(p.tensors["b"], want)


def test_decode_add_touches_only_the_kept_values():
    codec = get_codec("topk-int4", block_size=128, keep=3)
    x = _x(1000)
    out = torch.full((1000,), 2.0)
    codec.decode_add(codec.encode(x), 1000, out)
    assert torch.equal(out, codec.roundtrip(x) + 2.0)
    assert int((out != 2.0).sum()) <= 3 * 8


def test_config_refuses_sparse_without_error_feedback_and_bad_chunks():
    with pytest.raises(ConfigError, match="transport.error_feedback"):
        TransportSection(codec="topk-int2")
    with pytest.raises(ConfigError, match="transport.chunk"):
        TransportSection(codec="topk-int2", error_feedback=True, chunk=1000)
    with pytest.raises(ConfigError, match="transport.density"):
        TransportSection(codec="topk-int2", error_feedback=True, density=0.5)
    assert TransportSection(codec="topk-int4", error_feedback=True, density=0.03).keep == 123


def test_repeated_indices_are_refused_before_they_can_add_up_to_inf():
    """A hostile body repeating one index keep times would decode to keep·a (inf for a near
    the float range) although every scale looks finite: the validator refuses it by name."""
    import hashlib
    import json

    from fedtrain.server.validate import UpdateRejected
    from tests.transport.test_fuzz import PARAMS, ROUND, SILO, frame, split, validator

    codec = get_codec("topk-int2", block_size=8, keep=2)
    honest = {n: 1e37 * torch.ones(p.shape) for n, p in PARAMS.items()}
    data = encode_payload(
        honest, codec="topk-int2", kind="pseudo_grad", run_id="run-fuzz", round=ROUND,
        sender=SILO, block_size=8, keep=2,
    )  # fmt: skip
    assert validator(keys=False, bound=1e40).check(data, silo=SILO, round=ROUND) is not None
    header, body, _ = split(data)
    bad = bytearray(body)
    first = header["names"][0]
    offset = sum(s for n, s in zip(header["names"], header["sizes"], strict=True) if n < first)
    bad[offset + 2] = 0  # chunk 0 of the first tensor: both 3-bit indices 0
    header["body_sha256"] = hashlib.sha256(bad).hexdigest()
    forged = frame(json.dumps(header).encode(), bytes(bad))
    n = PARAMS[first].numel()
    assert codec.malformed(bytes(bad[offset : offset + header["sizes"][0]]), n)
    with pytest.raises(UpdateRejected, match="not strictly ascending"):
        validator(keys=False, bound=1e40).check(forged, silo=SILO, round=ROUND)


def test_a_huge_claimed_count_is_a_value_error_not_an_allocation_crash():
    codec = get_codec("topk-int2", block_size=1 << 16, keep=1)
    with pytest.raises(ValueError, match="do not hold"):
        codec.decode(b"\0" * 6, 1 << 44)  # a short body: refused by its size first
    n = 1 << 40  # 2^24 chunks of 6 bytes: 100 MB of body claim 4 TB of values
    with pytest.raises(ValueError, match="cannot allocate"):
        codec.decode(bytes(codec.encoded_size(n)), n)
    with pytest.raises(ValueError, match="chunk must be"):
        get_codec("topk-int2", block_size=1 << 20, keep=1)
    with pytest.raises(ValueError, match="keep must be"):
        get_codec("topk-int2", block_size=64, keep=64)
