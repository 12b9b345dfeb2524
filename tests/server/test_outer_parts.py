"""The outer step a parameter at a time, with the residual in the store, against the whole-model
reference (everything stepped at once, δ and the residual held whole): the same bits."""

from __future__ import annotations

import pytest
import torch

from fedtrain.config import config_from_dict
from fedtrain.models import PRESETS, build_model
from fedtrain.server.outer import outer_step_in_parts
from fedtrain.server.residual import StoredResidual
from fedtrain.storage.runstore import RunStore, _blob_ids
from fedtrain.strategies import build_strategy
from fedtrain.transport import decode_payload, encode_payload
from fedtrain.transport.feedback import ErrorFeedback
from fedtrain.transport.framing import PayloadWriter
from tests.conftest import tiny_config_dict


def _setup(strategy: str):
    data = tiny_config_dict()
    data["strategy"] = {"name": strategy, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    if strategy == "streaming":
        data["strategy"]["fragments"] = 2
        data["train"]["inner_steps"] = 4
    cfg = config_from_dict(data)
    model = build_model(PRESETS[cfg.model.preset], 64, seed=0)
    params = dict(model.named_parameters())
    return cfg, params, build_strategy(cfg, params, run_id="r")


def _mean(params, rnd):
    g = torch.Generator().manual_seed(rnd)
    return {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in params.items()}


def _kw(codec: str, rnd: int) -> dict:
    gen = torch.Generator().manual_seed(rnd)
    return dict(
        codec=codec,
        kind="update",
        run_id="r",
        round=rnd,
        sender="coordinator",
        meta={"accepted": ["a"]},
        stochastic=codec != "fp32",
        generator=gen,
    )


@torch.no_grad()
def _reference_step(strategy, params, mean, rnd, codec, feedback):
    """What the coordinator did before stepping in parts."""
    names = strategy.update_names(rnd) or list(params)
    old = {n: params[n].detach().clone() for n in names}
    with torch.enable_grad():
        strategy.step(mean, rnd)
    delta = {n: params[n].detach() - old[n] for n in names}
    send = feedback.compensate(delta) if feedback is not None else delta
    downlink = encode_payload(send, **_kw(codec, rnd))
    decoded = decode_payload(downlink).tensors
    if feedback is not None:
        feedback.stage(send, decoded)
        feedback.commit()
    for n in names:
        params[n].copy_(old[n] + decoded[n])
    return downlink


@pytest.mark.parametrize(
    "strategy,codec", [("diloco", "int4"), ("diloco", "fp32"), ("streaming", "int4")]
)
def test_parts_and_stored_residual_equal_the_whole_model_step(tmp_path, strategy, codec):
    cfg, ref_params, ref = _setup(strategy)
    _, params, parts = _setup(strategy)
    store = RunStore(tmp_path / "run")
    ef = ErrorFeedback() if codec != "fp32" else None
    stored = StoredResidual(store) if codec != "fp32" else None
    for rnd in (1, 2, 3, 4):  # momentum and residual non-zero from round 2 on
        mean = _mean(params, rnd)
        want = _reference_step(
            ref, ref_params, {n: t.clone() for n, t in mean.items()}, rnd, codec, ef
        )
        like = {n: params[n] for part in parts.outer_parts(rnd) for n in part}
        writer = PayloadWriter(like, **_kw(codec, rnd))
        got = outer_step_in_parts(parts, params, mean, rnd, writer, stored)
        assert bytes(got) == want
        for n, p in params.items():
            assert torch.equal(p, ref_params[n]), n
    got_state, want_state = parts.state_tensors()[0], ref.state_tensors()[0]
    assert set(got_state) == set(want_state)  # momentum buffers, created in another order
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    if stored is not None:
        assert set(stored.ids) == set(ef.residual)
        for n, blob in stored.ids.items():
            assert torch.equal(store.get_tensors(blob)[0][n], ef.residual[n])
        # The commit names them; retention and resume verification see every one.
        assert set(stored.ids.values()) <= _blob_ids({"feedback_blobs": stored.state()})


def test_a_residual_committed_whole_is_taken_over_per_tensor(tmp_path):
    store = RunStore(tmp_path / "run")
    old = {"a": torch.randn(5), "b": torch.randn(2, 3)}
    stored = StoredResidual(store)
    stored.restore_tensors(old)
    delta = torch.ones(2, 3)
    assert torch.equal(stored.compensate("b", delta), delta + old["b"])
    assert torch.equal(stored.compensate("new", delta), delta)
    again = StoredResidual(store)
    again.restore(stored.state())
    assert torch.equal(again.compensate("a", torch.zeros(5)), old["a"])
