"""64 virtual silos × 20 rounds under random faults (10% of replies lost, 5% corrupted): every
round commits, exactly the corrupted replies are rejected, repeat offenders are quarantined, and
the coordinator's aggregation buffer is the same as with 4 silos."""

from __future__ import annotations

import json

import pytest

from fedtrain.config import config_from_dict
from fedtrain.simulation.runner import simulate
from fedtrain.transport.faults import FaultPlan
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

ROUNDS, DROP, CORRUPT = 20, 0.10, 0.05


def _run(tmp_path, silos: int, rounds: int, **faults):
    cfg = config_from_dict(
        tiny_config_dict(
            run={"rounds": rounds, "eval_batches": 2, "eval_every_tokens": 10**9},
            data={"silos": silos, "max_chars": 600_000},
            train={
                "inner_steps": 1,
                "warmup_steps": 1,
                "batch_size": 2,
                "seq_len": 16,
                "threads": 1,
            },
            round={"min_silos": silos // 2},
            simulation={"profiles": [{"count": silos, "step_time_s": 0.01}]},
            faults=faults,
            # Silo checkpoints (64 models + optimizer states) only at the end.
            storage={"checkpoint_every": 1000, "cache_bytes": 0},
        )
    )
    out = tmp_path / f"{silos}x{rounds}"
    summary = simulate(cfg, out, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, rows


def _expected(cfg, silos: int) -> tuple[list[int], list[int], dict[str, int]]:
    """Valid and rejected replies per round, and quarantines, replayed from the fault plan."""
    plan = FaultPlan(drop_rate=DROP, corrupt_rate=CORRUPT, seed=cfg.run.seed)
    strikes: dict[str, int] = {}
    quarantined: dict[str, int] = {}
    valid, rejected = [], []
    for r in range(1, ROUNDS + 1):
        ok = bad = 0
        for s in cfg.silo_names():
            if s in quarantined:
                continue
            kinds = [f.kind for f in plan.at(s, r)]
            if "drop" in kinds:
                continue
            if "corrupt" in kinds:
                bad += 1
                strikes[s] = strikes.get(s, 0) + 1
                if strikes[s] == cfg.reliability.quarantine_after:
                    quarantined[s] = r
            else:
                ok += 1
        valid.append(ok)
        rejected.append(bad)
    return valid, rejected, quarantined


def test_64_silos_20_rounds_with_drops_and_corruption(tmp_path):
    _, few, few_rows = _run(tmp_path, 4, 2)
    cfg, many, rows = _run(tmp_path, 64, ROUNDS, drop_rate=DROP, corrupt_rate=CORRUPT)
    assert many["rounds"] == ROUNDS and many["rounds_failed"] == 0
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))  # every round committed
    valid, rejected, quarantined = _expected(cfg, 64)
    assert [r["silos"] for r in rows] == valid
    assert [r["rejected"] for r in rows] == rejected
    dropped = sum(64 - v - b for v, b in zip(valid, rejected, strict=True))
    assert sum(rejected) > 0 and dropped > 0
    assert many["quarantined"] == quarantined
    # The buffer is one fp32 sum of what a round syncs, not 64 updates: same as with 4 silos.
    assert {r["buffer_bytes"] for r in rows} == {few_rows[0]["buffer_bytes"]}
    assert many["max_buffer_bytes"] == few["max_buffer_bytes"] <= 4 * many["parameters"]
