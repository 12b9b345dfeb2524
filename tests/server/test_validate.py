"""UpdateValidator: size limit before parsing, ids, norm bound (reject or clip)."""

from __future__ import annotations

import math

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.config import ReliabilitySection
from fedtrain.server.validate import UpdateRejected, UpdateValidator, default_max_payload_bytes
from fedtrain.transport.payload import encode_payload

PARAMS = {
    "a": torch.nn.Parameter(torch.zeros(3, 4)),
    "b": torch.nn.Parameter(torch.zeros(5)),
}


def _payload(tensors, *, round=1, sender="s0", key=None, run_id="r"):
    return encode_payload(
        tensors,
        codec="fp32",
        kind="pseudo_grad",
        run_id=run_id,
        round=round,
        sender=sender,
        signing_key=key,
    )


def _update(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((3, 4), value), "b": torch.full((5,), value)}


def _validator(keys=None, **limits) -> UpdateValidator:
    return UpdateValidator(
        run_id="r",
        params=PARAMS,
        kind="pseudo_grad",
        limits=ReliabilitySection(**limits),
        public_keys=keys,
    )


def test_a_valid_update_passes_unchanged():
    p = _validator().check(_payload(_update(0.5)), silo="s0", round=1)
    assert torch.equal(p.tensors["a"], torch.full((3, 4), 0.5))


def test_norm_bound_rejects_or_clips_to_the_bound():
    norm = math.sqrt(17 * 2.0**2)  # 17 values of 2.0
    data = _payload(_update(2.0))
    with pytest.raises(UpdateRejected, match=r"update norm 8.246 exceeds .*max_update_norm = 1"):
        _validator(max_update_norm=1.0).check(data, silo="s0", round=1)
    p = _validator(max_update_norm=1.0, norm_action="clip").check(data, silo="s0", round=1)
    got = math.sqrt(sum(float(t.square().sum()) for t in p.tensors.values()))
    assert got == pytest.approx(1.0, rel=1e-6)
    assert p.meta["clipped_from_norm"] == pytest.approx(norm)
    # under the bound: untouched
    assert _validator(max_update_norm=10.0).check(data, silo="s0", round=1).tensors["b"][0] == 2.0


def test_size_limit_applies_before_parsing():
    v = _validator(max_payload_bytes=100)
    with pytest.raises(UpdateRejected, match="exceeds reliability.max_payload_bytes = 100"):
        v.check(b"\x00" * 101, silo="s0", round=1)
    assert _validator().max_bytes == default_max_payload_bytes(17) == 8 * 17 + (1 << 20)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"round": 2}, "is for round 2, expected 1"),
        ({"sender": "s1"}, "sent by 's1', expected 's0'"),
        ({"run_id": "other"}, "belongs to run 'other'"),
    ],
)
def test_ids_must_match_the_message(kwargs, words):
    with pytest.raises(UpdateRejected, match=words):
        _validator().check(_payload(_update(0.1), **kwargs), silo="s0", round=1)


def test_signatures_are_checked_against_the_claimed_silo():
    k0, k1 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    v = _validator(keys={"s0": k0.public_key(), "s1": k1.public_key()})
    assert v.check(_payload(_update(0.1), key=k0), silo="s0", round=1)
    with pytest.raises(UpdateRejected, match="signature does not verify"):
        v.check(_payload(_update(0.1), key=k1), silo="s0", round=1)  # another silo's key
    with pytest.raises(UpdateRejected, match="unsigned payload"):
        v.check(_payload(_update(0.1)), silo="s0", round=1)
    with pytest.raises(UpdateRejected, match="no public key for silo 's9'"):
        v.check(_payload(_update(0.1), sender="s9", key=k0), silo="s9", round=1)
