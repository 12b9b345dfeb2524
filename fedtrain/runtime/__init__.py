"""Process helpers shared by the coordinator and the silo: child processes started and stopped
by PID, signal handling, peak-memory reports, free ports, logs read from an offset, locks held
for a process's lifetime; the run's progress display.

Torch-free: the mailbox ClientApp and the launchers import it.
"""

from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    peak_rss_bytes,
    pids_matching,
    stop_flower_apps,
    stop_processes_using,
    tail,
)
from fedtrain.runtime.files import file_size, hold_lock, read_since
from fedtrain.runtime.progress import RunProgress

__all__ = [
    "Children",
    "RunProgress",
    "Stop",
    "file_size",
    "free_port",
    "hold_lock",
    "install_stop_handlers",
    "peak_rss_bytes",
    "pids_matching",
    "read_since",
    "stop_flower_apps",
    "stop_processes_using",
    "tail",
]
