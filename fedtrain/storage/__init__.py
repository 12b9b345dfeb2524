"""Run outputs: the run directory (metrics, events, summary, checkpoints), plots, reports."""

from fedtrain.storage.plots import plot_metrics
from fedtrain.storage.report import write_report
from fedtrain.storage.rundir import RunDir, atomic_write_bytes

__all__ = ["RunDir", "atomic_write_bytes", "plot_metrics", "write_report"]
