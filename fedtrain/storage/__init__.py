"""Run outputs: the run directory (metrics, events, summary, checkpoints) and plots."""

from fedtrain.storage.plots import plot_metrics
from fedtrain.storage.rundir import RunDir, atomic_write_bytes

__all__ = ["RunDir", "atomic_write_bytes", "plot_metrics"]
