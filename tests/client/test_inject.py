"""A deployed silo's fault hooks (fedtrain.client.inject) on a fake clock: which faults a silo
takes from its environment, drop holding the reply past the round's deadline, impersonate
sending another silo's shared payload, and the payload kinds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedtrain.client.inject import SiloFaults
from fedtrain.transport.payload import decode_payload, encode_payload


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _payload(sender: str, rnd: int = 2) -> bytes:
    return encode_payload(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        codec="fp32",
        kind="pseudo_grad",
        run_id="r",
        round=rnd,
        sender=sender,
    )


def _hooks(env: dict[str, str], silo: str = "silo0", clock: FakeClock | None = None) -> SiloFaults:
    faults = SiloFaults.from_env(silo, env)
    assert faults is not None
    if clock is not None:
        faults.clock, faults.sleep = clock, clock.sleep
    return faults


def test_environment_without_faults_or_share_changes_nothing():
    assert SiloFaults.from_env("silo0", {}) is None
    assert SiloFaults.from_env("silo0", {"FEDTRAIN_FAULTS": "nan@silo1:2"}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FEDTRAIN_FAULTS": "nan@silo0"}, "FEDTRAIN_FAULTS: fault 'nan@silo0': expected KIND@"),
        ({"FEDTRAIN_FAULTS": "boom@silo0:2"}, "unknown kind 'boom'"),
        (
            {"FEDTRAIN_FAULTS": "duplicate@silo1:3"},
            "fault 'duplicate@silo1:3': duplicate cannot be injected by a deployed silo",
        ),
        (
            {"FEDTRAIN_FAULTS": "impersonate@silo0:3"},
            "impersonate needs FEDTRAIN_FAULTS_SHARE",
        ),
    ],
)
def test_bad_specs_are_refused_with_the_spec_named(env, message):
    with pytest.raises(ValueError) as e:
        SiloFaults.from_env("silo0", env)
    assert message in str(e.value)


def test_drop_holds_the_reply_until_a_second_past_the_deadline():
    clock = FakeClock(1000.0)
    faults = _hooks({"FEDTRAIN_FAULTS": "drop@silo0:2"}, clock=clock)
    honest = _payload("silo0")
    assert faults.reply(1, honest, deadline_unix=1020.0) == honest and clock.slept == []
    assert faults.reply(2, honest, deadline_unix=1020.0) == honest  # late, not changed
    assert clock.slept == [21.0] and clock.now == 1021.0
    with pytest.raises(ValueError, match="deadline"):
        faults.reply(2, honest, deadline_unix=None)


def test_impersonate_sends_another_silos_shared_payload_of_the_round(tmp_path: Path):
    env = {"FEDTRAIN_FAULTS": "impersonate@silo0:*", "FEDTRAIN_FAULTS_SHARE": str(tmp_path)}
    clock = FakeClock()
    liar, honest = _hooks(env, "silo0", clock), _hooks(env, "silo1", clock)
    assert honest.plan is None  # silo1 only shares
    theirs = _payload("silo1")
    assert honest.reply(2, theirs) == theirs
    sent = liar.reply(2, _payload("silo0"))
    assert sent == theirs and decode_payload(sent).sender == "silo1"
    assert (tmp_path / "round-000002" / "silo0.bin").read_bytes() == _payload("silo0")
    # Nobody else shared round 3's payload: it waits wait_s, then says so.
    liar.wait_s = 5.0
    with pytest.raises(ValueError, match="no other silo's payload of round 3"):
        liar.reply(3, _payload("silo0", 3))
    assert 5.0 <= sum(clock.slept) <= 5.5


def test_payload_kinds_replace_the_honest_reply():
    faults = _hooks(
        {"FEDTRAIN_FAULTS": "nan@silo0:2,delay@silo0:3=7"}, clock=(clock := FakeClock())
    )
    bad = decode_payload(faults.reply(2, _payload("silo0"))).tensors["w"]
    assert math.isnan(float(bad.reshape(-1)[0])) and clock.slept == []
    assert faults.reply(3, _payload("silo0", 3)) == _payload("silo0", 3)
    assert clock.slept == [7.0]
