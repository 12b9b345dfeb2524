"""The run assembly: an in-process run built around the engine handed to it; the server side
imports nothing from the simulation package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtrain.config import config_from_dict
from fedtrain.run import EngineInputs, Run, RunExists, build_run
from fedtrain.server.engine import Engine
from fedtrain.simulation.inprocess import InProcessEngine
from fedtrain.simulation.runner import inprocess_engine
from tests.conftest import tiny_config_dict


def test_build_run_assembles_an_inprocess_run_around_the_engine_it_is_handed(tmp_path):
    cfg = config_from_dict(
        tiny_config_dict(
            run={"rounds": 1, "eval_batches": 2},
            train={"inner_steps": 2, "batch_size": 2, "seq_len": 16, "threads": 1},
            transport={"sign_updates": True},
            storage={"cache_bytes": 0},
        )
    )
    seen: list[EngineInputs] = []
    make = inprocess_engine(step_time_s=0.01)

    def factory(inputs: EngineInputs) -> Engine:
        seen.append(inputs)
        # The store exists before the engine: its events can go there from the start.
        assert (inputs.run_dir / "config.toml").exists() and inputs.resumed is None
        return make(inputs)

    run = build_run(cfg, tmp_path / "r", factory, quiet=True)
    assert isinstance(run, Run) and isinstance(run.engine, InProcessEngine)
    (inputs,) = seen
    assert inputs.store is run.store and inputs.model is run.model
    assert run.coordinator.engine is run.engine and run.coordinator.store is run.store
    # Signing keys come from the engine (the in-process silos made them).
    assert set(run.coordinator.public_keys) == set(cfg.silo_names())
    summary = run.execute()
    assert summary["rounds"] == 1 and summary["measured_step_time_s"] == 0.01
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["run_id"] == run.run_id
    with pytest.raises(RunExists):  # a finished run is never overwritten
        build_run(cfg, tmp_path / "r", factory, quiet=True)


def test_the_server_package_imports_nothing_from_the_simulation_package():
    code = (
        "import sys\n"
        "import fedtrain.server.app, fedtrain.server.deploy, fedtrain.server.flower_engine\n"
        "import fedtrain.server.coordinator, fedtrain.server.round, fedtrain.run\n"
        "print([m for m in sys.modules if m.startswith('fedtrain.simulation')])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
