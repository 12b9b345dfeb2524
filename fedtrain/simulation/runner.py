"""``fedtrain simulate``: one run (:mod:`fedtrain.run`) over in-process silos, or over Flower's
simulation runtime (:mod:`fedtrain.simulation.flower`), outputs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtrain.config import Config, ConfigError
from fedtrain.run import EngineFactory, EngineInputs, Run, build_run
from fedtrain.simulation.inprocess import InProcessEngine

__all__ = ["build_simulation", "inprocess_engine", "simulate"]


def simulate(
    cfg: Config,
    run_dir: Path,
    *,
    quiet: bool = False,
    step_time_s: float | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` with its ``simulation.engine`` (in-process, or Flower's simulation runtime:
    :mod:`fedtrain.simulation.flower`); write the run directory; return the summary.

    With ``resume``, continue the run in ``run_dir`` from its last intact committed round.
    """
    refuse_analytic_only(cfg)
    if cfg.simulation.engine == "flower":
        from fedtrain.simulation.flower import simulate_flower

        return simulate_flower(cfg, run_dir, quiet=quiet, resume=resume)
    return build_simulation(
        cfg, run_dir, quiet=quiet, step_time_s=step_time_s, resume=resume
    ).execute()


def refuse_analytic_only(cfg: Config) -> None:
    """A training run has a real coordinator whose links are the silos' own: the analytic
    mode's all-reduce topology and shared coordinator link are refused there, by name."""
    sim = cfg.simulation
    if sim.topology != "star":
        raise ConfigError(
            f"simulation.topology = {sim.topology!r} is analytic mode only (fedtrain simulate "
            "--analytic): a training run synchronises through its coordinator ('star')"
        )
    if sim.coordinator_mbps:
        raise ConfigError(
            "simulation.coordinator_mbps is analytic mode only (fedtrain simulate --analytic); "
            "a training run times each silo's own link"
        )


def build_simulation(
    cfg: Config,
    run_dir: Path,
    *,
    quiet: bool = False,
    step_time_s: float | None = None,
    resume: bool = False,
) -> Run:
    """The run of ``cfg`` over in-process silos, assembled (no training yet)."""
    return build_run(cfg, run_dir, inprocess_engine(step_time_s), quiet=quiet, resume=resume)


def inprocess_engine(step_time_s: float | None = None) -> EngineFactory:
    """An :class:`InProcessEngine` factory. ``step_time_s`` fixes the simulated seconds per
    inner step where the profiles do not (None: measured once); a resumed run keeps the step
    time it measured."""

    def make(inputs: EngineInputs) -> InProcessEngine:
        resumed = inputs.resumed or {}
        return InProcessEngine(
            inputs.cfg,
            inputs.run_id,
            inputs.data.silo_tokens,
            inputs.model_factory,
            on_step=inputs.progress.step,
            step_time_s=resumed.get("measured_step_time_s") or step_time_s,
        )

    return make
