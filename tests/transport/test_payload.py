import pytest
import torch

from fedtrain.transport import PayloadError, decode_payload, encode_payload, get_codec


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g),
        "empty": torch.zeros(0),
    }


def _encode(**kw):
    args = dict(
        codec="fp32", kind="pseudo_grad", run_id="r", round=2, sender="silo1", meta={"tokens": 64}
    )
    args.update(kw)
    return encode_payload(_tensors(), **args)


def test_fp32_round_trip_is_exact_with_ids_and_meta():
    p = decode_payload(_encode())
    assert (p.kind, p.run_id, p.round, p.sender, p.codec) == (
        "pseudo_grad",
        "r",
        2,
        "silo1",
        "fp32",
    )
    assert p.meta == {"tokens": 64}
    for n, t in _tensors().items():
        assert torch.equal(p.tensors[n], t) and p.tensors[n].shape == t.shape


def test_body_size_is_what_the_codec_says():
    data = _encode()
    numel = sum(t.numel() for t in _tensors().values())
    header_len = int.from_bytes(data[4:8], "big")
    assert len(data) == 8 + header_len + get_codec("fp32").encoded_size(numel)


def test_truncated_payload_is_rejected():
    data = _encode()
    with pytest.raises(PayloadError, match="truncated"):
        decode_payload(data[:-4])
    with pytest.raises(PayloadError, match="truncated header"):
        decode_payload(data[:20])


def test_corrupted_body_is_rejected():
    data = bytearray(_encode())
    data[-3] ^= 0xFF
    with pytest.raises(PayloadError, match="checksum"):
        decode_payload(bytes(data))


def test_not_a_payload_is_rejected():
    with pytest.raises(PayloadError, match="magic"):
        decode_payload(b"hello world")


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown codec"):
        _encode(codec="zip")
