"""``fedtrain server`` loads its config for deployment: the simulated silo profiles do not
apply there, so a silo count they do not add up to is no error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtrain.config import ConfigError
from fedtrain.server.launcher import ServerOptions, _load_run

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


def test_the_server_does_not_check_simulation_profiles(tmp_path: Path) -> None:
    opts = ServerOptions(config=QUICKSTART, run_dir=tmp_path / "run", overrides=("data.silos=3",))
    _, cfg, run_dir = _load_run(opts)
    assert cfg.data.silos == 3 and cfg.simulation.profiles == []
    assert run_dir == (tmp_path / "run").resolve()


def test_the_server_still_checks_the_rules_that_apply(tmp_path: Path) -> None:
    opts = ServerOptions(config=QUICKSTART, run_dir=tmp_path / "run", overrides=("data.silos=2",))
    with pytest.raises(ConfigError, match="round.min_silos: 3 is not allowed"):
        _load_run(opts)
