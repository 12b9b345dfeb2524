"""Sequential gradient coding (SR-SGC) under the (B, W, λ)-bursty straggler model."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedtrain.strategies.gradient_coding import decode
from fedtrain.strategies.sgc import SRSGC, BurstyModel, bursty_pattern, sr_sgc_stragglers


def test_tolerance_and_load_match_the_paper_example():
    # n=256, B=2, W=5, λ=32: s = ⌈64/6⌉ = 11, load 12/256 ≈ 0.047 (GC would need λ=32: 0.129).
    assert sr_sgc_stragglers(2, 5, 32) == 11
    model = BurstyModel(256, 2, 5, 32)
    assert SRSGC(256, model).load == pytest.approx(12 / 256)
    assert 33 / 256 == pytest.approx(0.129, abs=1e-3)


def test_bursty_model_on_hand_made_patterns():
    m = BurstyModel(n=4, b=2, w=4, lam=2)
    assert m.conforms([{0}, {0}, set(), set(), {1}])  # one burst of 2
    assert not m.conforms([{0}, {0}, {0}])  # burst of 3 > B
    assert not m.conforms([{0}, set(), {0}])  # two bursts inside one window
    assert m.conforms([{0}, set(), set(), set(), {0}])  # ... but fine in separate windows
    assert not m.conforms([{0}, {1}, {2}])  # 3 distinct stragglers in a window > λ
    with pytest.raises(ValueError, match="B < W"):
        BurstyModel(n=4, b=3, w=3, lam=1)


CASES = [(8, 2, 5, 2), (12, 1, 3, 3), (10, 2, 5, 4), (16, 3, 7, 6), (6, 1, 4, 2)]


@pytest.mark.parametrize("n, b, w, lam", CASES)
def test_every_job_decodes_by_t_plus_b_under_random_conforming_patterns(n, b, w, lam):
    model = BurstyModel(n, b, w, lam)
    rounds = 30
    beyond_gc = 0
    for seed in range(20):
        pattern = bursty_pattern(model, rounds, rate=0.7, rng=random.Random(seed))
        assert model.conforms(pattern)
        sgc = SRSGC(n, model)
        beyond_gc += sum(len(p) > sgc.s for p in pattern)
        for t, stragglers in enumerate(pattern):
            sgc.run_round(t, stragglers)
        assert sgc.waits == 0  # never had to fall back
        for job in range(rounds - b):
            assert job in sgc.decoded and sgc.decoded[job] <= job + b, (seed, job)
            assert decode(sgc.b, sorted(sgc.results[job])).exact
    assert beyond_gc > 0  # rounds a plain (n, s) code could not have decoded on time


@pytest.mark.parametrize("n, b, w, lam", CASES)
def test_non_conforming_patterns_wait_instead_of_decoding_wrongly(n, b, w, lam):
    model = BurstyModel(n, b, w, lam)
    rng = np.random.default_rng(n)
    waited = 0
    for _ in range(10):
        pattern = [set(np.flatnonzero(rng.random(n) < 0.35).tolist()) for _ in range(20)]
        sgc = SRSGC(n, model)
        outcomes = [sgc.run_round(t, p) for t, p in enumerate(pattern)]
        waited += sgc.waits
        for o in outcomes:
            if o.waited_for_all and not model.allows(sgc.history[: o.round], pattern[o.round]):
                assert o.delivered == set(range(n))  # waited for every worker
        for job in range(20 - b):
            assert sgc.decoded[job] <= job + b
            assert decode(sgc.b, sorted(sgc.results[job])).exact  # never a wrong decode
    assert waited > 0
