"""The metadata cache and its workloads against a real run store on disk."""

from __future__ import annotations

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from fedtrain.storage.cache import MetadataCache, flatten
from fedtrain.storage.functions import (
    FunctionContext,
    exact_shapley,
    leave_one_out,
    monte_carlo_shapley,
    run_function,
)
from fedtrain.storage.runstore import RunStore
from fedtrain.transport import decode_payload, encode_payload

SILOS = ["silo0", "silo1", "silo2", "silo3"]
SHAPES = {"a": (64, 32), "b": (100,)}


class CountingFS(LocalFileSystem):
    """A local filesystem that counts every read of a file (the backend reads)."""

    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = 0

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self.reads += 1
        return super()._open(path, mode=mode, **kwargs)


def _update(rnd: int, silo: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rnd + SILOS.index(silo))
    base = torch.Generator().manual_seed(rnd)
    common = {n: torch.randn(s, generator=base) for n, s in SHAPES.items()}
    out = {n: common[n] + 0.3 * torch.randn(s, generator=g) for n, s in SHAPES.items()}
    if silo == "silo3":  # a silo sending a flipped, scaled update
        out = {n: -5 * t for n, t in out.items()}
    return out


def _populate(store: RunStore, rounds: int, cache: MetadataCache | None = None) -> None:
    """Write rounds the way the coordinator does: updates, then state, then commit."""
    weights = {n: torch.zeros(s) for n, s in SHAPES.items()}
    store.index.set_meta("initial_global_blob", store.put_tensors(weights))
    for rnd in range(1, rounds + 1):
        store.start_round(rnd)
        agg = {n: torch.zeros(s) for n, s in SHAPES.items()}
        for silo in SILOS:
            upd = _update(rnd, silo)
            data = encode_payload(
                upd, codec="fp32", kind="pseudo_grad", run_id="r", round=rnd, sender=silo
            )
            store.store_update(rnd, silo, data, valid=True, reason=None, codec="fp32", weight=1.0)
            for n in agg:
                agg[n] += upd[n] / len(SILOS)
        weights = {n: weights[n] - agg[n] for n in weights}
        state = {
            "global_blob": store.put_tensors(weights),
            "aggregate_blob": store.put_tensors(agg),
        }
        store.index.commit_round(rnd, state, {"round": rnd})
        if cache is not None:
            cache.on_commit(rnd)


def _target() -> dict[str, torch.Tensor]:
    return {n: torch.full(s, -0.5) for n, s in SHAPES.items()}


def _evaluate(w: dict[str, torch.Tensor]) -> float:
    t = _target()
    return float(sum(((w[n] - t[n]) ** 2).sum() for n in w))


@pytest.fixture
def store(tmp_path):
    fs = CountingFS()
    return RunStore(tmp_path, url=f"file://{tmp_path}/blobs", fs=fs)


def test_after_commit_a_round_workload_makes_zero_backend_reads(store):
    cache = MetadataCache(store, budget_bytes=64 << 20)
    _populate(store, 3, cache)
    fs = store.blobs.fs
    fs.reads = 0
    ctx = FunctionContext(cache=cache)
    run_function("similarity", ctx, round=3)
    run_function("anomalies", ctx, round=3)
    run_function("debug_round", ctx, round=3)
    run_function("latest_model", ctx)
    assert fs.reads == 0
    assert cache.stats.hits > 0


def test_cached_result_equals_the_computation_straight_from_the_store(store):
    cache = MetadataCache(store, budget_bytes=64 << 20)
    _populate(store, 2, cache)
    cached = run_function("similarity", FunctionContext(cache=cache), round=2)
    # Independently: decode blobs from the backend and compute cosine by hand.
    agg = store.get_tensors(store.index.round_state(2)["aggregate_blob"])[0]
    for row in store.index.updates(2):
        upd = decode_payload(store.blobs.get(row["blob"])).tensors
        expected = torch.nn.functional.cosine_similarity(flatten(upd), flatten(agg), dim=0)
        assert cached[row["silo"]] == pytest.approx(expected.item(), abs=1e-7)


def test_resident_bytes_never_exceed_the_budget_and_evicted_data_is_in_the_store(store):
    one_update = sum(torch.Size(s).numel() * 4 for s in SHAPES.values())
    budget = 3 * one_update  # smaller than one round (4 updates + aggregate + weights)
    cache = MetadataCache(store, budget_bytes=budget)
    _populate(store, 3)
    for rnd in (1, 2, 3):
        cache.on_commit(rnd)
        assert cache.resident_bytes <= budget
        for silo in SILOS:
            cache.update(rnd, silo)
            assert cache.resident_bytes <= budget
    assert cache.stats.evictions > 0 and cache.stats.peak_bytes <= budget
    fresh = MetadataCache(store, budget_bytes=64 << 20)
    for rnd in (1, 2, 3):  # every evicted object can still be read from the store
        for silo in SILOS:
            assert torch.equal(flatten(cache.update(rnd, silo)), flatten(fresh.update(rnd, silo)))


def test_latest_round_is_pinned_and_old_rounds_leave(store):
    cache = MetadataCache(store, budget_bytes=64 << 20, keep_rounds=2)
    _populate(store, 4, cache)
    rounds = {k[1] for k in cache._lru}
    assert rounds == {3, 4}
    assert ("aggregate", 4, "") in cache.pinned and ("global", 4, "") in cache.pinned
    assert ("aggregate", 3, "") not in cache.pinned


def test_anomaly_detection_flags_the_flipped_silo(store):
    cache = MetadataCache(store, budget_bytes=64 << 20)
    _populate(store, 1, cache)
    out = run_function("anomalies", FunctionContext(cache=cache), round=1)
    assert out["flagged"] == ["silo3"]
    assert out["silos"]["silo3"]["cluster"] != out["silos"]["silo0"]["cluster"]


def test_contribution_scores_with_an_evaluator(store):
    cache = MetadataCache(store, budget_bytes=64 << 20)
    _populate(store, 1, cache)
    ctx = FunctionContext(cache=cache, evaluate=_evaluate)
    loo = run_function("contribution", ctx, round=1, method="loo")
    shap = run_function("contribution", ctx, round=1, method="shapley")
    assert min(loo, key=loo.get) == "silo3" and min(shap, key=shap.get) == "silo3"
    # Efficiency on the real utility: Σφ = v(N) − v(∅).
    start = cache.global_weights(0)
    after = cache.global_weights(1)
    assert sum(shap.values()) == pytest.approx(-_evaluate(after) + _evaluate(start), rel=1e-4)
    with pytest.raises(ValueError, match="evaluator"):
        run_function("contribution", FunctionContext(cache=cache), round=1)


# ---------------------------------------------------------------- game theory
def _toy_game(s: frozenset[str]) -> float:
    # a and b are symmetric; n is a null player; c adds 1 only together with a.
    return 2.0 * ("a" in s) + 2.0 * ("b" in s) + 1.0 * ("a" in s and "c" in s)


def test_exact_shapley_efficiency_symmetry_and_null_player():
    phi = exact_shapley(["a", "b", "c", "n"], _toy_game)
    assert sum(phi.values()) == pytest.approx(_toy_game(frozenset("abcn")) - 0.0)
    assert phi["a"] == pytest.approx(2.5) and phi["c"] == pytest.approx(0.5)
    assert phi["b"] == pytest.approx(2.0) and phi["n"] == 0.0


def test_monte_carlo_shapley_approaches_exact():
    exact = exact_shapley(["a", "b", "c", "n"], _toy_game)
    mc = monte_carlo_shapley(["a", "b", "c", "n"], _toy_game, permutations=2000, seed=1)
    assert all(abs(mc[p] - exact[p]) < 0.05 for p in exact)
    assert mc["n"] == 0.0


def test_leave_one_out_by_hand():
    # v(N) = 5; without a: 2; without b: 3; without c: 4; without n: 5.
    assert leave_one_out(["a", "b", "c", "n"], _toy_game) == {
        "a": 3.0,
        "b": 2.0,
        "c": 1.0,
        "n": 0.0,
    }


def test_what_does_not_fit_the_budget_is_not_built_and_reads_fall_back(store):
    """A budget below one model (a large model's default): nothing is kept, not even pinned,
    the per-silo scalars are still recorded, and every workload reads from the store."""
    one_update = sum(torch.Size(s).numel() * 4 for s in SHAPES.values())
    cache = MetadataCache(store, budget_bytes=one_update // 2)
    _populate(store, 2, cache)
    assert cache.resident_bytes == 0 and cache.stats.peak_bytes == 0 and not cache._lru
    assert {s for (r, s) in cache.stats.scalars if r == 2} == set(SILOS)
    big = MetadataCache(store, budget_bytes=64 << 20)
    big.on_commit(2)
    for silo in SILOS:
        got = cache.stats.scalars[(2, silo)]
        want = big.stats.scalars[(2, silo)]
        assert got["cosine_to_aggregate"] == pytest.approx(want["cosine_to_aggregate"], abs=1e-12)
        assert torch.equal(flatten(cache.update(2, silo)), flatten(big.update(2, silo)))
    assert run_function("similarity", FunctionContext(cache=cache), round=2)
