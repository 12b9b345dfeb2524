"""The in-process engine's clock: synchronous rounds from payload sizes, and overlap (τ)."""

from __future__ import annotations

import json

import pytest

from fedtrain.config import load_config
from fedtrain.simulation.runner import simulate

pytestmark = pytest.mark.slow

BASE = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=300000",
    "run.token_budget=0",
    "run.eval_batches=4",
    "train.inner_steps=8",
    "train.seq_len=32",
    "train.batch_size=4",
    "round.min_silos=1",
    "storage.cache_bytes=0",
    "simulation.profiles=[{name='slow', count=2, step_time_s=0.1, up_mbps=8.0, "
    "down_mbps=8.0, latency_ms=0.0}]",
]


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_synchronous_round_time_is_download_plus_compute_plus_upload(tmp_path):
    simulate(load_config(None, BASE + ["run.rounds=2"]), tmp_path / "r", quiet=True)
    r1, r2 = _rows(tmp_path / "r")
    up = r2["max_payload_bytes"]  # both silos send the same size
    down = r2["bytes_down"] / 2  # the broadcast, per silo
    # 8 Mbit/s = 1e6 bytes/s; 8 steps at 0.1 s.
    assert r2["round_time_s"] == pytest.approx(down / 1e6 + 0.8 + up / 1e6, rel=1e-9)
    assert r1["round_time_s"] == pytest.approx(0.8 + r1["max_payload_bytes"] / 1e6, rel=1e-9)


def test_overlap_hides_communication_behind_compute(tmp_path):
    stream = ["strategy.name=streaming", "strategy.fragments=2", "run.rounds=6"]
    sync = simulate(
        load_config(None, BASE + stream + ["strategy.delay_steps=0"]), tmp_path / "t0", quiet=True
    )
    over = simulate(
        load_config(None, BASE + stream + ["strategy.delay_steps=3"]), tmp_path / "t3", quiet=True
    )
    assert over["silo_compute_s"] == sync["silo_compute_s"]  # same work
    assert over["sim_time_s"] < sync["sim_time_s"]
    assert over["compute_utilisation"] > sync["compute_utilisation"]
    # With τ = 3 steps (0.3 s) of overlap, each later round saves up to 0.3 s of waiting.
    assert sync["sim_time_s"] - over["sim_time_s"] <= 5 * 0.3 + 1e-9
