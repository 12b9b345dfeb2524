"""The coordinator's memory and disk at a few million parameters, through bench/coordinator_scale.py
(the real Coordinator, strategy, validator, aggregation and run store; synthetic replies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "coordinator_scale.py"


@pytest.mark.slow
def test_coordinator_adds_under_three_models_and_its_disk_stops_growing(tmp_path):
    # glibc returns freed buffers of 256 KiB and more to the system at once (its default adapts
    # the threshold up to 32 MiB, so a small model's freed tensors would stay resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 18)}
    argv = [
        sys.executable,
        str(BENCH),
        "--params",
        "1.5e7",
        "--silos",
        "2",
        "--codec",
        "int4",
        "--rounds",
        "5",
        "--set",
        "storage.cache_bytes=1000000",
        "--dir",
        str(tmp_path),
        "--json",
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak_reset"]
    # Above the process with its weights: outer momentum + the running sum + one reply and a
    # few tensors (the residual lives in the store). A model-sized copy anywhere adds 1.
    assert got["added_rss_over_model"] < 3.6, got
    model_bytes = 4 * got["params"]
    # Retention: after the window, a round adds its metrics and events only.
    assert got["disk_bytes_per_round"] < 0.01 * model_bytes, got
    assert max(got["disk_bytes"]) < 12 * model_bytes, got
