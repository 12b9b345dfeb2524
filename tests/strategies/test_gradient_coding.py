"""Gradient coding: every (n−s)-subset decodes to the true sum (exhaustive for n ≤ 12, s ≤ 3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedtrain.strategies.coded import CodedSum
from fedtrain.strategies.gradient_coding import (
    choose_construction,
    cyclic_matrix,
    decode,
    frc_matrix,
)

CASES = [(n, s) for n in range(2, 13) for s in range(1, 4) if s < n]


def _grads(n: int, d: int = 16) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, d))  # row j = g_j of shard j


@pytest.mark.parametrize("n, s", CASES)
def test_every_n_minus_s_subset_decodes_the_true_sum(n, s):
    name, s_eff, b = choose_construction(n, s)
    assert s_eff in (s, s + 1)
    assert all(np.count_nonzero(row) == s_eff + 1 for row in b)  # s+1 shards per worker
    g = _grads(n)
    y = b @ g  # what each worker returns
    truth = g.sum(axis=0)
    for arrived in itertools.combinations(range(n), n - s):
        dec = decode(b, list(arrived))
        assert dec.exact, (name, n, s, arrived)
        assert all(dec.a[i] == 0 for i in range(n) if i not in arrived)  # stragglers
        got = dec.a @ y
        assert np.linalg.norm(got - truth) <= 1e-6 * np.linalg.norm(truth)
        if name == "cyclic":
            assert np.linalg.norm(dec.a) <= 8.1  # well conditioned


def test_frc_decodes_with_one_arrival_per_replica_class():
    b = frc_matrix(6, 1)  # classes {0,1}, {2,3}, {4,5}
    dec = decode(b, [1, 2, 5])
    assert np.allclose(dec.a, [0, 1, 1, 0, 0, 1])
    assert not decode(b, [0, 1, 2]).exact  # class {4,5} missing: not decodable


def test_cyclic_rows_cover_consecutive_shards():
    b = cyclic_matrix(7, 2)
    for i in range(7):
        assert set(np.flatnonzero(b[i])) == {i, (i + 1) % 7, (i + 2) % 7}


def test_approximate_decode_bound_with_too_few_arrivals():
    n, s = 9, 2
    _, _, b = choose_construction(n, s)
    g = _grads(n)
    truth = g.sum(axis=0)
    for arrived in itertools.combinations(range(n), n - s - 2):
        dec = decode(b, list(arrived))
        bound = dec.error * np.linalg.norm(g, 2)  # ε_F·‖G‖₂
        assert np.linalg.norm(dec.a @ (b @ g) - truth) <= bound + 1e-9


def test_invalid_requests_are_clear_errors():
    with pytest.raises(ValueError, match=r"\(s\+1\) \| n"):
        frc_matrix(7, 1)
    with pytest.raises(ValueError, match="n−s odd"):
        cyclic_matrix(8, 2)
    with pytest.raises(ValueError, match="coding='frc' needs"):
        choose_construction(7, 1, "frc")


@pytest.mark.parametrize("n, s", [(5, 2), (6, 1), (7, 3), (9, 2)])
def test_random_cyclic_code_decodes_every_subset_but_is_poorly_conditioned(n, s, caplog):
    with caplog.at_level("WARNING"):
        name, s_eff, b = choose_construction(n, s, "random")
    assert name == "random" and s_eff == s and "conditioned" in caplog.text
    assert all(np.count_nonzero(row) == s + 1 for row in b)
    g = _grads(n)
    truth = g.sum(axis=0)
    norms = []
    for arrived in itertools.combinations(range(n), n - s):
        dec = decode(b, list(arrived))
        assert dec.exact
        got = dec.a @ (b @ g)
        assert np.linalg.norm(got - truth) <= 1e-6 * np.linalg.norm(truth)
        norms.append(np.linalg.norm(dec.a))
    _, _, good = choose_construction(n, s)
    best = max(
        np.linalg.norm(decode(good, list(f)).a) for f in itertools.combinations(range(n), n - s)
    )
    assert max(norms) > best  # why it is last resort only


def _coded_replies(b: np.ndarray, silos: list[str]) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(b.shape[0], 5, generator=gen, dtype=torch.float64)
    y = {s: {"w": (torch.tensor(b[i]) @ g).float()} for i, s in enumerate(silos)}
    return y, g.sum(dim=0) / b.shape[0]


@pytest.mark.parametrize("n, s", [(4, 1), (5, 2), (6, 2)])
def test_coded_sum_closes_when_decodable_and_returns_the_mean_shard_update(n, s):
    _, _, b = choose_construction(n, s)
    silos = [f"silo{i}" for i in range(n)]
    y, truth = _coded_replies(b, silos)
    for late in itertools.combinations(range(n), s):
        agg = CodedSum(b, silos, shard_tokens=10)
        assert not agg.done()
        for i in range(n):
            if i not in late:
                agg.add(y[silos[i]], 1.0, sender=silos[i])
        assert agg.done()
        mean = agg.mean()
        assert torch.allclose(mean["w"].double(), truth, rtol=1e-5, atol=1e-6)
        assert agg.report()["decode_exact"] and agg.tokens(0) == n * 10


def test_coded_sum_with_too_few_arrivals_reports_the_approximation_error():
    _, _, b = choose_construction(6, 1)
    silos = [f"silo{i}" for i in range(6)]
    y, _ = _coded_replies(b, silos)
    agg = CodedSum(b, silos, shard_tokens=1)
    for s in ("silo0", "silo1", "silo2"):  # replica class {4, 5} missing
        agg.add(y[s], 1.0, sender=s)
    assert not agg.done()
    assert agg.mean() is not None
    report = agg.report()
    assert report["decode_exact"] is False and report["decode_error"] > 0.5
