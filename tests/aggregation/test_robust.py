"""Robust aggregators: exact values, resistance to scaled / flipped updates, config refusals."""

from __future__ import annotations

import pytest
import torch

from fedtrain.aggregation.mean import StreamingMean
from fedtrain.aggregation.robust import (
    ClippedMean,
    CoordinateMedian,
    RobustAggregation,
    TrimmedMean,
)
from fedtrain.config import ConfigError, config_from_dict
from fedtrain.simulation.runner import simulate
from tests.conftest import tiny_config_dict


def _feed(agg, values, weights=None):
    for i, v in enumerate(values):
        agg.add({"w": torch.tensor(v, dtype=torch.float32)}, (weights or [1.0] * 9)[i], f"s{i}")
    return agg.mean()["w"]


def test_median_and_trimmed_mean_hand_computed():
    vals = [[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0], [4.0, 2.0]]
    assert _feed(CoordinateMedian(), vals).tolist() == [3.0, 1.0]
    assert _feed(CoordinateMedian(), vals[:4]).tolist() == [2.5, 0.5]  # even: middle pair
    # β = 0.2 of 5 drops one value at each end per coordinate.
    assert _feed(TrimmedMean(0.2), vals).tolist() == pytest.approx([3.0, 1.0])
    # β = 0 is the plain (unweighted) mean.
    assert _feed(TrimmedMean(0.0), vals).tolist() == pytest.approx([22.0, 1.6])


def test_clipped_mean_scales_only_updates_over_the_bound():
    agg = ClippedMean(clip_norm=5.0)
    got = _feed(agg, [[3.0, 4.0], [30.0, 40.0]])  # norms 5 (kept) and 50 (scaled to 5)
    assert got.tolist() == pytest.approx([3.0, 4.0])
    assert agg.report()["clipped"] == ["s1"]


def test_robust_aggregators_resist_scaled_and_flipped_updates():
    g = torch.Generator().manual_seed(0)
    honest = [torch.randn(1000, generator=g) * 0.1 + 1.0 for _ in range(7)]
    truth = torch.stack(honest).mean(0)
    bad = [-100.0 * honest[0], 50.0 * honest[1]]  # f = 2 Byzantine silos of 9
    errors = {}
    aggs = {
        "mean": StreamingMean(),
        "median": CoordinateMedian(),
        "trimmed": TrimmedMean(0.25),
        "clipped": ClippedMean(clip_norm=40.0),
    }
    for name, agg in aggs.items():
        for i, t in enumerate(honest + bad):
            agg.add({"w": t}, 1.0, f"s{i}")
        errors[name] = float((agg.mean()["w"] - truth).norm() / truth.norm())
    assert errors["mean"] > 5.0  # the plain mean is dragged far away
    assert errors["median"] < 0.1
    assert errors["trimmed"] < 0.1
    assert errors["clipped"] < errors["mean"] / 5


def test_held_updates_grow_with_the_count_and_reject_mismatched_tensors():
    agg = CoordinateMedian()
    agg.add({"w": torch.zeros(10)}, 1.0, "a")
    agg.add({"w": torch.zeros(10)}, 1.0, "b")
    assert agg.buffer_bytes == 2 * 10 * 4
    with pytest.raises(ValueError, match="other tensors"):
        agg.add({"v": torch.zeros(10)}, 1.0, "c")
    assert CoordinateMedian().mean() is None


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"round": {"tree": 2}}, "round.tree"),
        ({"round": {"accumulate": "int64"}}, "int64"),
        ({"strategy": {"aggregator": "median", "name": "ddp"}}, "strategy.name"),
        ({"strategy": {"aggregator": "median", "coding": "frc", "stragglers": 1}}, "coding"),
    ],
)
def test_robust_aggregators_refuse_what_they_cannot_combine_with(sections, match):
    sections.setdefault("strategy", {}).setdefault("aggregator", "trimmed_mean")
    with pytest.raises(ConfigError, match=f"strategy.aggregator.*{match}"):
        config_from_dict(tiny_config_dict(**sections))


def test_bad_robust_settings_are_named():
    with pytest.raises(ConfigError, match="strategy.trim_fraction"):
        config_from_dict(tiny_config_dict(strategy={"trim_fraction": 0.5}))
    with pytest.raises(ConfigError, match="strategy.aggregator"):
        config_from_dict(tiny_config_dict(strategy={"aggregator": "krum"}))
    assert RobustAggregation("median").new_aggregator().kind == "median"


@pytest.mark.slow
def test_median_runs_end_to_end_and_equals_the_mean_for_two_silos(tmp_path):
    # With two silos the coordinate median is the mean of both: the unweighted mean.
    base = {"run": {"rounds": 2}, "train": {"threads": 1}, "data": {"max_chars": 200_000}}
    med = simulate(
        config_from_dict(tiny_config_dict(**base, strategy={"aggregator": "median"})),
        tmp_path / "m",
        quiet=True,
    )
    mean = simulate(
        config_from_dict(tiny_config_dict(**base, strategy={"weighting": "equal"})),
        tmp_path / "e",
        quiet=True,
    )
    assert med["rounds"] == 2 and med["rounds_failed"] == 0
    assert med["final_eval_loss"] == pytest.approx(mean["final_eval_loss"], rel=1e-5)


BYZANTINE = ["scale@silo6:*=-10", "scale@silo7:*=-10"]  # f = 2 of 8 silos, every round
LOSS_BOUND = 0.06
"""Median / trimmed mean under attack stay within 6% of the honest run's final eval loss."""


@pytest.mark.slow
def test_byzantine_silos_median_and_trimmed_mean_hold_the_loss_mean_does_not(tmp_path):
    def run(name: str, inject: list[str], **strategy) -> float:
        cfg = tiny_config_dict(
            run={"rounds": 5, "eval_batches": 4},
            data={"silos": 8, "max_chars": 400_000},
            train={"inner_steps": 10, "warmup_steps": 2, "batch_size": 4, "threads": 1},
            strategy=strategy,
            simulation={"profiles": [{"count": 8, "step_time_s": 0.01}]},
            storage={"checkpoint_every": 1000, "cache_bytes": 0},
            faults={"inject": inject},
        )
        s = simulate(config_from_dict(cfg), tmp_path / name, quiet=True)
        assert s["rounds"] == 5 and s["rejected"] == 0  # the lies are well-formed and signed
        return float(s["final_eval_loss"])

    honest = run("honest", [])
    attacked = {
        "mean": run("mean", BYZANTINE),
        "median": run("median", BYZANTINE, aggregator="median"),
        "trimmed": run("trimmed", BYZANTINE, aggregator="trimmed_mean", trim_fraction=0.25),
    }
    for name in ("median", "trimmed"):
        assert attacked[name] <= honest * (1 + LOSS_BOUND), (name, attacked[name], honest)
    # The mean follows the attackers: (6 g - 20 g') / 8 points uphill, and the loss climbs.
    assert attacked["mean"] > 2 * honest, (attacked["mean"], honest)
