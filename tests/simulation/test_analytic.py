"""Analytic mode: overlap arithmetic, utilisation vs bandwidth, FLOPs-derived step times."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedtrain.config import ConfigError, config_from_dict
from fedtrain.models.hardware import step_time_from_flops
from fedtrain.run import RunExists
from fedtrain.simulation.analytic import (
    BANDWIDTH_GRID_GBPS,
    SyncModel,
    analytic_run,
    exposed_comm_s,
    model_size,
    required_bandwidth,
    utilisation,
)
from fedtrain.simulation.runner import simulate
from tests.conftest import tiny_config_dict

# 4 layers, 0.3 s steps: the backward pass is 0.2 s, 0.05 s per layer.
LAYERS, STEP = 4, 0.3


def test_chunks_shorter_than_a_layer_expose_only_the_last_one():
    # Each 0.02 s chunk leaves as its layer finishes; the last leaves at 0.20 s, ends at 0.22 s.
    assert exposed_comm_s([0.02] * 4, LAYERS, STEP) == pytest.approx(0.02)


def test_chunks_longer_than_a_layer_queue_on_the_link():
    # Start at 0.05 s, four 0.1 s chunks back to back: done at 0.45 s, backward ends at 0.20 s.
    assert exposed_comm_s([0.1] * 4, LAYERS, STEP) == pytest.approx(0.25)


def test_overlap_hides_up_to_tau_steps_then_the_silo_waits():
    assert exposed_comm_s([0.1] * 4, LAYERS, STEP, hide_s=0.3) == 0.0  # τ=1 step hides it
    assert exposed_comm_s([0.1] * 4, LAYERS, STEP, hide_s=0.2) == pytest.approx(0.05)
    assert exposed_comm_s([0.1] * 4, LAYERS, STEP, hide_s=0.2, latency_s=0.1) == pytest.approx(0.15)


def test_diloco_period_is_h_steps_plus_one_exposed_sync():
    m = SyncModel(params=4e9, layers=4, step_time_s=STEP, method="diloco", inner_steps=10)
    # 4e9 params x 16 bits x 1 (ring, 2 workers) = 64 Gbit over 160 Gbit/s: 0.1 s per layer chunk.
    compute, wall = m.period(160.0)
    assert compute == pytest.approx(3.0)
    assert wall == pytest.approx(3.0 + 0.25)
    assert utilisation(m, 160.0) == pytest.approx(3.0 / 3.25)


@pytest.mark.parametrize("method", ["ddp", "diloco", "streaming"])
def test_infinite_bandwidth_gives_full_utilisation(method):
    m = SyncModel(params=1e9, layers=24, step_time_s=0.1, method=method, fragments=8)
    assert utilisation(m, math.inf) == 1.0


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "ddp"},
        {"method": "diloco"},
        {"method": "streaming", "fragments": 8},
        {"method": "streaming", "fragments": 8, "overlap_steps": 1, "bits_per_param": 4.0},
        {"method": "diloco", "collective": "star", "latency_s": 0.05},
    ],
)
def test_utilisation_is_monotone_in_bandwidth(kw):
    m = SyncModel(params=1e9, layers=24, step_time_s=0.1, **kw)
    u = [utilisation(m, g) for g in BANDWIDTH_GRID_GBPS]
    assert all(a <= b for a, b in zip(u, u[1:], strict=False))
    assert u[0] < 0.5 < u[-1]


def test_required_bandwidth_is_the_first_grid_point_reaching_the_target():
    m = SyncModel(params=1e9, layers=24, step_time_s=0.1, method="ddp", bits_per_param=13.5)
    got = required_bandwidth(m, 0.5)
    assert got is not None
    i = BANDWIDTH_GRID_GBPS.index(got)
    assert utilisation(m, got) >= 0.5 > utilisation(m, BANDWIDTH_GRID_GBPS[i - 1])
    assert got == pytest.approx(86.8, rel=0.01)  # Streaming DiLoCo Table 4, 1B data parallel
    # More payload needs more bandwidth; a target nobody reaches gives None.
    heavier = SyncModel(params=1e9, layers=24, step_time_s=0.1, method="ddp", bits_per_param=32)
    assert required_bandwidth(heavier, 0.5) > got  # type: ignore[operator]
    assert required_bandwidth(m, 0.99, grid=[0.1, 1.0]) is None


def test_step_time_from_flops_hand_computed():
    # 6 x 1e9 params x 1e6 tokens = 6e15 FLOP on one H100 (989.4 TFLOP/s) at 50% MFU.
    assert step_time_from_flops(1e9, 1e6, "h100", 1, 0.5) == pytest.approx(6e15 / 494.7e12)
    assert step_time_from_flops(1e9, 1e6, "a100", 8, 0.5) == pytest.approx(6e15 / (8 * 156e12))
    with pytest.raises(ValueError, match="unknown hardware"):
        step_time_from_flops(1e9, 1e6, "tpu", 1, 0.5)


_PROFILE = {
    "name": "dc",
    "count": 2,
    "gpu": "a100",
    "mfu": 0.5,
    "up_mbps": 100.0,
    "down_mbps": 100.0,
    "latency_ms": 0.0,
}


def _analytic_cfg(**over):
    sections = {
        "run": {"rounds": 0, "token_budget": 2_000_000},
        "simulation": {"profiles": [_PROFILE]},
    }
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return config_from_dict(tiny_config_dict(**sections))


def test_analytic_run_times_a_config_without_training(tmp_path):
    cfg = _analytic_cfg()
    summary = analytic_run(cfg, tmp_path / "a")
    params, layers = model_size(cfg)
    step = 6 * params * cfg.train.tokens_per_step / (312e12 * 0.5)
    assert summary["step_time_s"]["silo0"] == pytest.approx(step)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["rounds"]
    assert rows[-1]["tokens"] == summary["tokens"]
    assert summary["tokens"] >= cfg.run.token_budget
    # Every round: 10 steps of compute, then the whole model up and down at 100 Mbit/s, all of
    # it exposed (a DiLoCo pseudo-gradient exists only after the last inner step).
    wait = 2 * params * 32 / 100e6
    assert rows[0]["round_time_s"] == pytest.approx(10 * step + wait, rel=1e-6)
    assert rows[0]["utilisation"] == pytest.approx(10 * step / (10 * step + wait), rel=1e-5)
    assert 0 < summary["compute_utilisation"] < 1
    assert (tmp_path / "a" / "plots" / "utilisation_vs_time.png").exists()
    # Same run with a 4-bit codec: less waiting, higher utilisation, ~1/8 of the bytes.
    small = analytic_run(_analytic_cfg(transport={"codec": "int4"}), tmp_path / "b")
    assert small["compute_utilisation"] > summary["compute_utilisation"]
    assert small["bytes_total"] < summary["bytes_total"] / 7
    with pytest.raises(RunExists):  # an existing run is never overwritten
        analytic_run(cfg, tmp_path / "a")


def _first_round_s(tmp_path, name, **over):
    summary = analytic_run(_analytic_cfg(**over), tmp_path / name)
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return summary["step_time_s"]["silo0"], json.loads(rows[0])


def test_ring_topology_coordinator_link_and_latency_hand_computed(tmp_path):
    params, _ = model_size(_analytic_cfg())
    bits = params * 32  # fp32 payload S
    # Ring, M = 2: reduce-scatter + all-gather = 2 hops of S/2 at 100 Mbit/s, 2 x 15 ms latency.
    sim = {"topology": "ring", "profiles": [{**_PROFILE, "latency_ms": 15.0}]}
    step, row = _first_round_s(tmp_path, "ring", simulation=sim)
    assert row["round_time_s"] == pytest.approx(10 * step + bits / 100e6 + 0.030, rel=1e-6)
    assert row["bytes_up"] == pytest.approx(2 * bits / 8, rel=1e-6)  # 2 silos x 2(M-1)/M S
    # M = 3, unequal links: 4 hops of S/3 at the slowest link (40 Mbit/s down), each charged the
    # largest latency (25 ms); every silo sends 4/3 S.
    slow = {**_PROFILE, "name": "slow", "count": 1, "up_mbps": 200.0, "down_mbps": 40.0}
    mixed = [{**_PROFILE, "latency_ms": 10.0}, {**slow, "latency_ms": 25.0}]
    step, row = _first_round_s(
        tmp_path, "ring3", simulation={"topology": "ring", "profiles": mixed}, data={"silos": 3}
    )
    assert row["round_time_s"] == pytest.approx(10 * step + 4 / 3 * bits / 40e6 + 0.1, rel=1e-6)
    assert row["bytes_up"] == pytest.approx(3 * 4 / 3 * bits / 8, rel=1e-6)
    # Star with latency: one each way.
    sim = {"profiles": [{**_PROFILE, "latency_ms": 15.0}]}
    step, row = _first_round_s(tmp_path, "star-lat", simulation=sim)
    assert row["round_time_s"] == pytest.approx(10 * step + 2 * bits / 100e6 + 0.030, rel=1e-6)
    # Star through a 50 Mbit/s coordinator link: it carries both silos' S each way.
    step, row = _first_round_s(tmp_path, "star", simulation={"coordinator_mbps": 50.0})
    assert row["round_time_s"] == pytest.approx(10 * step + 2 * (2 * bits / 50e6), rel=1e-6)
    # A coordinator link faster than the silos' own changes nothing.
    _, fast = _first_round_s(tmp_path, "fast", simulation={"coordinator_mbps": 1e6})
    _, free = _first_round_s(tmp_path, "free")
    assert fast["round_time_s"] == pytest.approx(free["round_time_s"], rel=1e-9)
    # Rounds in which every silo of the ring dropped out move nothing and cost nothing.
    lossy = {"topology": "ring", "profiles": [{**_PROFILE, "dropout": 0.7}]}
    analytic_run(_analytic_cfg(simulation=lossy), tmp_path / "lossy")
    rows = [json.loads(x) for x in (tmp_path / "lossy" / "metrics.jsonl").read_text().splitlines()]
    empty = [r for r in rows if r["silos"] == 0]
    assert empty and all(r["bytes_up"] == 0 and r["round_time_s"] == 0 for r in empty)


def test_a_streaming_fragment_sync_hides_only_behind_tau_steps(tmp_path):
    # A fragment's pseudo-gradient exists after the last optimizer step: no backward overlap,
    # only τ = 1 further step hides it.
    stream = {"name": "streaming", "fragments": 2, "delay_steps": 1}
    step, row = _first_round_s(tmp_path, "s", strategy=stream)
    params, _ = model_size(_analytic_cfg())
    fragment_s = 2 * (params * 32 / 2) / 100e6  # half the model up and down at 100 Mbit/s
    assert fragment_s > step
    assert row["step"] == 5  # a round is H/P = 5 steps and one fragment's sync
    assert row["round_time_s"] == pytest.approx(5 * step + fragment_s - step, rel=1e-6)


def test_training_runs_refuse_the_analytic_only_topology_keys(tmp_path):
    with pytest.raises(ConfigError, match="simulation.coordinator_mbps.*ring"):
        _analytic_cfg(simulation={"topology": "ring", "coordinator_mbps": 10.0})
    for sim, key in (({"topology": "ring"}, "topology"), ({"coordinator_mbps": 10.0}, "coord")):
        cfg = config_from_dict(tiny_config_dict(simulation=sim))
        with pytest.raises(ConfigError, match=f"simulation.{key}.*analytic mode only"):
            simulate(cfg, tmp_path / key, quiet=True)
        assert not (tmp_path / key).exists()


def test_analytic_run_refuses_what_it_cannot_time(tmp_path):
    no_hw = config_from_dict(tiny_config_dict())
    with pytest.raises(ConfigError, match="step_time_s > 0 or a gpu"):
        analytic_run(no_hw, tmp_path / "x")
    compass = _analytic_cfg(strategy={"scheduling": "compass"})
    with pytest.raises(ConfigError, match="synchronous"):
        analytic_run(compass, tmp_path / "y")
    with pytest.raises(ConfigError, match="simulation.profiles\\[dc\\].gpu"):
        _analytic_cfg(simulation={"profiles": [{"name": "dc", "gpu": "v100"}]})


@pytest.mark.slow
def test_training_run_charges_flops_derived_compute_and_reports_utilisation(tmp_path):
    cfg = _analytic_cfg(run={"rounds": 2, "token_budget": 0}, data={"max_chars": 200_000})
    summary = simulate(cfg, tmp_path / "t", quiet=True)
    params = summary["parameters"]
    step = 6 * params * cfg.train.tokens_per_step / (312e12 * 0.5)
    assert summary["silo_compute_s"]["silo0"] == pytest.approx(20 * step, rel=1e-9)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 < r["utilisation_min"] <= r["utilisation"] <= 1
        assert r["idle_s"] == pytest.approx(r["round_time_s"] * (1 - r["utilisation"]), abs=1e-5)
    assert (tmp_path / "t" / "plots" / "utilisation_vs_round.png").exists()


def test_intellect1_table2_from_the_papers_inputs():
    # bench/intellect1_table2.py: real analytic runs of the paper's config (10B, H = 100, int8,
    # ring of 14, links at which the all-reduce takes the paper's median time). The links are
    # solved from the sync times, so what this checks is that the clock's ring matches the
    # bench's (bandwidth, latency hops, traffic factor) and that the sync is not overlapped.
    bench = Path(__file__).parents[2] / "bench" / "intellect1_table2.py"
    r = subprocess.run(
        [sys.executable, str(bench), "--json"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    syncs = {"USA": 103.0, "USA + Europe": 382.0, "global": 469.0}
    assert [row["setting"] for row in rows] == list(syncs)
    for row in rows:
        assert abs(row["ours"] - row["paper"]) <= 0.5, row
        # the whole sync exposed: H steps of compute over compute plus the all-reduce
        assert row["ours"] == pytest.approx(100 * 2280 / (2280 + syncs[row["setting"]]), abs=0.01)
