"""Simulation: virtual clock and network model, in-process engine, the runner, sweeps."""

from fedtrain.simulation.clock import SiloTiming, VirtualClock, transfer_time
from fedtrain.simulation.sweep import run_sweep
from fedtrain.simulation.sweep_plan import plan_sweep

__all__ = ["SiloTiming", "VirtualClock", "plan_sweep", "run_sweep", "transfer_time"]
