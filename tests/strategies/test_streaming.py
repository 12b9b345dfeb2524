"""Streaming DiLoCo: fragments, schedule, overlap/mixing semantics, config checks, end to end."""

from __future__ import annotations

import pytest
import torch

from fedtrain.client import SiloTrainer
from fedtrain.client.worker import SiloWorker
from fedtrain.config import ConfigError, TrainSection, TransportSection, load_config
from fedtrain.data import TokenStream
from fedtrain.models import PRESETS, build_model
from fedtrain.protocol.work import TrainWork
from fedtrain.strategies import StreamingDiLoCo
from fedtrain.strategies.streaming import fragment_at_step, split_fragments
from fedtrain.transport import encode_payload

NAMES = sorted(dict(build_model(PRESETS["tiny"], 256, 0).named_parameters()))


@pytest.mark.parametrize("pattern", ["strided", "contiguous"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_every_parameter_is_in_exactly_one_fragment(pattern, p):
    frags = split_fragments(NAMES, 4, p, pattern)
    flat = [n for f in frags for n in f]
    assert sorted(flat) == NAMES and len(flat) == len(set(flat))
    assert "tok_emb.weight" in frags[0] and "norm.weight" in frags[-1]
    block_of = {n: int(n.split(".")[1]) for n in NAMES if n.startswith("layers.")}
    for i, frag in enumerate(frags):
        blocks = {block_of[n] for n in frag if n in block_of}
        if pattern == "strided":
            assert blocks == {b for b in range(4) if b % p == i}
        else:
            assert blocks == set(range(i * 4 // p, (i + 1) * 4 // p))


def test_p_larger_than_the_layer_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fragments must be in \[1, 4\]"):
        split_fragments(NAMES, 4, 5)


@pytest.mark.parametrize("h, p, tau", [(12, 3, 0), (12, 3, 3), (8, 4, 1), (10, 1, 9)])
def test_one_fragment_in_flight_and_every_parameter_synced_once_per_h(h, p, tau):
    frags = split_fragments(NAMES, 4, p)
    in_flight: list[tuple[int, int, int]] = []  # (fragment, sent_at, applied_at)
    for t in range(1, 4 * h + 1):
        frag = fragment_at_step(t, h, p)
        if frag is not None:
            in_flight.append((frag, t, t + tau))
    for (_, _s1, a1), (_, s2, _) in zip(in_flight, in_flight[1:], strict=False):
        assert a1 < s2  # the previous result lands before the next fragment is sent
    for start in range(1, 3 * h + 1):  # any window of H consecutive steps
        synced = [n for (f, s, _) in in_flight if start <= s < start + h for n in frags[f]]
        assert sorted(synced) == NAMES


def test_offsets_follow_t_p_equals_p_times_h_over_p():
    # Fragment p syncs at t ≡ p·H/P (mod H): H=12, P=3 -> fragment 1 at 4, 16; 2 at 8; 0 at 12.
    assert [fragment_at_step(t, 12, 3) for t in (4, 8, 12, 16)] == [1, 2, 0, 1]
    assert fragment_at_step(5, 12, 3) is None and fragment_at_step(0, 12, 3) is None


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.inner_steps=10", "strategy.fragments=4"], "a divisor of train.inner_steps = 10"),
        (
            ["train.inner_steps=8", "strategy.fragments=2", "strategy.delay_steps=4"],
            "less than H/P = 4",
        ),
        (["strategy.mix_alpha=1.5"], "strategy.mix_alpha: 1.5 is not allowed"),
        (["strategy.delay_steps=-1"], "strategy.delay_steps: -1 is not allowed"),
        (["strategy.fragment_pattern=random"], "'strided' or 'contiguous'"),
    ],
)
def test_bad_h_p_tau_alpha_combinations_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["strategy.name=streaming", *override])
    assert message in str(e.value)


def test_outer_step_touches_only_the_round_fragment_and_state_round_trips():
    params = {n: torch.nn.Parameter(torch.randn(3)) for n in NAMES}
    s = StreamingDiLoCo(params, n_layers=4, inner_steps=8, fragments=2)
    before = {n: p.detach().clone() for n, p in params.items()}
    frag = s.update_names(1)
    s.step({n: torch.ones(3) for n in frag}, 1)
    assert all(not torch.equal(params[n], before[n]) for n in frag)
    assert all(torch.equal(params[n], before[n]) for n in NAMES if n not in frag)
    tensors, meta = s.state_tensors()
    clone_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    clone = StreamingDiLoCo(clone_params, n_layers=4, inner_steps=8, fragments=2)
    clone.load_state_tensors(tensors, meta)
    for st in (s, clone):
        st.step({n: torch.ones(3) for n in frag}, 3)  # round 3: same fragment again
    assert all(torch.equal(params[n], clone_params[n]) for n in NAMES)


def _worker() -> SiloWorker:
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    trainer = SiloTrainer(
        "silo0",
        build_model(PRESETS["tiny"], 256, 0),
        TokenStream(tokens, seed=0, stream_id="silo0"),
        TrainSection(batch_size=2, seq_len=16, warmup_steps=0),
        20,
    )
    return SiloWorker(trainer, run_id="r", seed=0, transport=TransportSection())


def _update_for(worker: SiloWorker, names: list[str]) -> bytes:
    delta = {n: torch.full_like(worker.trainer.params[n], 0.01) for n in names}
    return encode_payload(
        delta,
        codec="fp32",
        kind="update",
        run_id="r",
        round=1,
        sender="coordinator",
        meta={"accepted": ["silo0"]},
    )


def test_alpha_zero_discards_exactly_the_tau_local_steps_of_that_fragment():
    frag = split_fragments(NAMES, 4, 2)[1]
    merged, twin = _worker(), _worker()
    anchor = {n: merged.trainer.anchor[n].clone() for n in NAMES}
    tau = 2
    work = TrainWork(steps=tau, names=frag, apply_at=tau, alpha=0.0)
    merged.handle(2, work, _update_for(merged, frag))
    twin.trainer.train(tau)  # the same τ local steps, no merge
    for n in NAMES:
        got = merged.trainer.params[n].detach()
        if n in frag:  # the fragment's τ steps are gone: it equals the new global value
            assert torch.equal(got, anchor[n] + 0.01)
            assert not torch.equal(got, twin.trainer.params[n].detach())
        else:  # other fragments keep their τ local steps
            assert torch.equal(got, twin.trainer.params[n].detach())


def test_alpha_one_leaves_local_weights_untouched():
    frag = split_fragments(NAMES, 4, 2)[0]
    mixed, ignored = _worker(), _worker()
    work = TrainWork(steps=3, names=frag, apply_at=1, alpha=1.0)
    mixed.handle(2, work, _update_for(mixed, frag))
    ignored.handle(2, work, None)
    for n in NAMES:
        assert torch.equal(mixed.trainer.params[n], ignored.trainer.params[n])
    # ... while the global copy θ̃ did move.
    assert torch.equal(mixed.trainer.anchor[frag[0]], ignored.trainer.anchor[frag[0]] + 0.01)


# ------------------------------------------------------------------ end to end
COMMON = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=600000",
    "run.rounds=0",
    "run.token_budget=16384",
    "run.eval_batches=8",
    "train.inner_steps=8",
    "train.seq_len=32",
    "train.batch_size=4",
    "round.min_silos=1",
    "simulation.profiles=[]",
    "storage.cache_bytes=0",
]


@pytest.mark.slow
def test_p1_tau0_alpha0_reproduces_plain_diloco_bitwise(tmp_path):
    from fedtrain.simulation.runner import build_simulation

    runs = {}
    for label, extra in (
        ("diloco", []),
        (
            "streaming",
            [
                "strategy.name=streaming",
                "strategy.fragments=1",
                "strategy.delay_steps=0",
                "strategy.mix_alpha=0",
            ],
        ),
    ):
        sim = build_simulation(load_config(None, COMMON + extra), tmp_path / label, quiet=True)
        sim.execute()
        runs[label] = {n: p.detach() for n, p in sim.model.named_parameters()}
    assert all(torch.equal(runs["diloco"][n], runs["streaming"][n]) for n in runs["diloco"])


@pytest.mark.slow
def test_streaming_p2_int4_ef_matches_diloco_loss_with_smaller_peak_payloads(tmp_path):
    from fedtrain.simulation.runner import simulate

    diloco = simulate(load_config(None, COMMON), tmp_path / "d", quiet=True)
    streaming = simulate(
        load_config(
            None,
            COMMON
            + [
                "strategy.name=streaming",
                "strategy.fragments=2",
                "transport.codec=int4",
                "transport.error_feedback=true",
            ],
        ),
        tmp_path / "s",
        quiet=True,
    )
    assert streaming["tokens"] == diloco["tokens"] == 16384
    assert streaming["rounds"] == 2 * diloco["rounds"]  # a commit per fragment sync
    assert streaming["final_eval_loss"] <= diloco["final_eval_loss"] + 0.05
    assert streaming["max_payload_bytes"] <= 0.6 * diloco["max_payload_bytes"]
    assert 1.8 < streaming["peak_reduction_vs_full_model"] < 2.2  # ~P fewer values per sync
