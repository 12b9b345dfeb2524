"""Process helpers shared by the coordinator and the silo: child processes started and stopped
by PID, signal handling, peak-memory reports, free ports; the run's progress display.

Torch-free: the mailbox ClientApp and the launchers import it.
"""

from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    peak_rss_bytes,
    pids_matching,
    stop_processes_using,
    tail,
)
from fedtrain.runtime.progress import RunProgress

__all__ = [
    "Children",
    "RunProgress",
    "Stop",
    "free_port",
    "install_stop_handlers",
    "peak_rss_bytes",
    "pids_matching",
    "stop_processes_using",
    "tail",
]
