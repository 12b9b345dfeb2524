import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.transport import PayloadError, decode_payload, encode_payload
from fedtrain.transport.payload import SignatureError

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def _signed(key=KEY, **kw):
    args = dict(
        codec="int4",
        kind="pseudo_grad",
        run_id="run",
        round=3,
        sender="silo0",
        signing_key=key,
        meta={"tokens": 10},
    )
    args.update(kw)
    return encode_payload({"w": torch.randn(100)}, **args)


def test_valid_signature_verifies():
    p = decode_payload(_signed(), public_key=KEY.public_key())
    assert p.signed and p.sender == "silo0" and p.round == 3


def test_signed_by_another_key_is_rejected():
    with pytest.raises(SignatureError, match="another key"):
        decode_payload(_signed(OTHER), public_key=KEY.public_key())


def test_modified_after_signing_is_rejected_before_the_checksum():
    data = bytearray(_signed())
    data[-70] ^= 0x01  # inside the body, before the signature
    with pytest.raises(SignatureError):
        decode_payload(bytes(data), public_key=KEY.public_key())


def test_ids_are_covered_so_a_payload_cannot_be_replayed_into_another_round():
    data = _signed()
    forged = data.replace(b'"round":3', b'"round":4')
    assert forged != data
    with pytest.raises(PayloadError):
        decode_payload(forged, public_key=KEY.public_key())


def test_unsigned_payload_is_rejected_when_signatures_are_required():
    with pytest.raises(SignatureError, match="unsigned"):
        decode_payload(_signed(key=None), public_key=KEY.public_key())


def test_truncated_signature_is_rejected():
    with pytest.raises(PayloadError, match="truncated"):
        decode_payload(_signed()[:-10], public_key=KEY.public_key())
