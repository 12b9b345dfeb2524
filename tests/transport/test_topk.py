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
