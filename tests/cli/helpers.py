"""Running ``fedtrain`` commands as a user does (a subprocess) on a tiny simulated run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TINY_RUN = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.max_chars=300000",
    "run.token_budget=0",
    "run.eval_batches=4",
    "train.batch_size=4",
    "train.seq_len=32",
    "round.min_silos=1",
    "simulation.profiles=[]",
]
"""Overrides of a run that takes seconds (add silos, rounds and inner steps)."""


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def simulate_tiny(out: Path, *sets: str) -> Path:
    """A finished tiny run in ``out`` with :data:`TINY_RUN` plus ``sets``."""
    overrides = [x for s in [*TINY_RUN, *sets] for x in ("--set", s)]
    r = cli("simulate", "--quiet", "--run-dir", str(out), *overrides)
    assert r.returncode == 0, r.stderr
    return out
