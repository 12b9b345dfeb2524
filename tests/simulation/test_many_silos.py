"""64 virtual silos: the coordinator's aggregation buffer does not grow with the silo count."""

from __future__ import annotations

import json

import pytest

from fedtrain.config import config_from_dict
from fedtrain.simulation.runner import simulate
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


def _run(tmp_path, silos: int, **strategy):
    cfg = config_from_dict(
        tiny_config_dict(
            run={"rounds": 2, "eval_batches": 2},
            data={"silos": silos, "max_chars": 600_000},
            train={
                "inner_steps": 2,
                "warmup_steps": 1,
                "batch_size": 2,
                "seq_len": 16,
                "threads": 1,
            },
            strategy=strategy,
            simulation={"profiles": [{"count": silos, "step_time_s": 0.01}]},
            # Silo checkpoints (64 models + optimizer states) only at the end.
            storage={"checkpoint_every": 100, "cache_bytes": 0},
        )
    )
    out = tmp_path / f"{silos}-{strategy.get('name', 'diloco')}"
    summary = simulate(cfg, out, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_buffer_bytes_are_independent_of_the_silo_count(tmp_path):
    few, few_rows = _run(tmp_path, 4)
    many, many_rows = _run(tmp_path, 64)
    assert many["rounds"] == 2 and many["rounds_failed"] == 0
    assert all(r["silos"] == 64 for r in many_rows)
    assert many["max_buffer_bytes"] > 0
    assert many["max_buffer_bytes"] == few["max_buffer_bytes"]
    assert [r["buffer_bytes"] for r in many_rows] == [r["buffer_bytes"] for r in few_rows]
    # The buffer is one fp32 sum of what a round syncs, not 64 updates.
    assert many["max_buffer_bytes"] <= 4 * many["parameters"]
