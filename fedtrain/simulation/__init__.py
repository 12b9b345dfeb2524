"""Simulation: virtual clock and network model, in-process engine, the simulate runner."""

from fedtrain.simulation.clock import SiloTiming, VirtualClock, transfer_time

__all__ = ["SiloTiming", "VirtualClock", "transfer_time"]
