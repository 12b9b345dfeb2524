"""The Ray instance under Flower's simulation runtime: its settings, a quiet terminal, and
nothing left running afterwards.

Ray gets this machine's cores, an object store capped at :data:`OBJECT_STORE_BYTES` (so it fits
a small ``/dev/shm``; larger objects spill to disk), a fresh local instance with a temporary
directory of its own, and no log forwarding to the terminal. ``ray.shutdown()`` does not wait
for its worker processes (an actor takes seconds to exit), so :func:`ray_session` adopts them
(Linux ``PR_SET_CHILD_SUBREAPER``), waits briefly, kills what is left and reaps it all — after
a finished, failed or interrupted run alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["OBJECT_STORE_BYTES", "backend_config", "flower_log_to", "ray_session"]

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 << 20
"""Ray object store size (messages between the coordinator and the actors pass through it)."""
_PR_SET_CHILD_SUBREAPER = 36


def backend_config(cpus_per_silo: int, temp_dir: str) -> dict[str, Any]:
    """Flower's Ray backend settings: all cores, ``cpus_per_silo`` per actor (so the pool holds
    cores / cpus_per_silo actors), a capped object store, Ray's temporary files in
    ``temp_dir``."""
    cores = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": max(1, min(cpus_per_silo, cores)), "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # a fresh local instance, never a cluster found on the machine
            "num_cpus": cores,
            "object_store_memory": OBJECT_STORE_BYTES,
            "_temp_dir": temp_dir,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }


@contextlib.contextmanager
def ray_session(cpus_per_silo: int) -> Iterator[dict[str, Any]]:
    """Yield the backend config for one simulation; afterwards shut Ray down and stop, reap
    and delete everything it started."""
    # Ray's own default is /tmp/ray (RAY_TMPDIR), not $TMPDIR: its socket paths must stay short.
    temp_dir = tempfile.mkdtemp(prefix="fedtrain-ray-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    before = frozenset(_descendants())
    _subreaper(True)
    try:
        yield backend_config(cpus_per_silo, temp_dir)
    finally:
        import ray

        from fedtrain.runtime.children import stop_processes_using

        if ray.is_initialized():
            ray.shutdown()
        _stop_ray_processes(temp_dir, grace_s=1.0, before=before)
        _subreaper(False)
        stop_processes_using(temp_dir)  # anything not adopted (not below this process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def flower_log_to(path: Path) -> Iterator[None]:
    """Send Flower's log to ``path`` instead of the terminal, and silence Ray's warnings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flwr_log = logging.getLogger("flwr")
    old = list(flwr_log.handlers)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in old:
        flwr_log.removeHandler(h)
    flwr_log.addHandler(handler)
    propagate, flwr_log.propagate = flwr_log.propagate, False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            yield
    finally:
        flwr_log.removeHandler(handler)
        flwr_log.propagate = propagate
        handler.close()
        for h in old:
            flwr_log.addHandler(h)


def _subreaper(on: bool) -> None:
    """Adopt (Linux) the processes Ray's shutdown orphans, so they can be waited for here."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process this one can see."""
    procs: dict[int, tuple[int, str, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            procs[int(entry.name)] = (int(fields[1]), fields[0], cmd)
        except (OSError, IndexError, ValueError):
            continue
    return procs


def _descendants(procs: dict[int, tuple[int, str, str]] | None = None) -> set[int]:
    """Processes below this one (children, theirs, and orphans it adopted)."""
    procs = _process_table() if procs is None else procs
    me = os.getpid()

    def below_me(pid: int) -> bool:
        seen = set()
        while pid in procs and pid not in seen:
            seen.add(pid)
            pid = procs[pid][0]
            if pid == me:
                return True
        return False

    return {pid for pid in procs if below_me(pid)}


def _ray_processes(
    temp_dir: str, before: frozenset[int] = frozenset()
) -> tuple[set[int], set[int]]:
    """Processes below this one that Ray started (actors, idle workers, its daemons): those
    still running, and those already exited but not yet reaped (zombies: any below this process
    that was not there ``before`` the session, since an exited process has no command line)."""
    procs = _process_table()
    alive, exited = set(), set()
    for pid in _descendants(procs):
        _, state, cmd = procs[pid]
        if state == "Z":
            if pid not in before:
                exited.add(pid)
        elif cmd.startswith("ray::") or temp_dir in cmd:
            alive.add(pid)
    return alive, exited


def _reap(pids: set[int]) -> None:
    """Collect the exit status of those of ``pids`` that are exited children (adopted ones)."""
    for pid in list(pids):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # gone, or another process's child: its parent reaps it
            pids.discard(pid)
            continue
        if done:
            pids.discard(pid)


def _stop_ray_processes(temp_dir: str, grace_s: float, before: frozenset[int]) -> None:
    """Wait up to ``grace_s`` for Ray's processes to exit, SIGKILL the rest, reap them."""
    deadline = time.monotonic() + grace_s
    killed = False
    seen: set[int] = set()
    while True:
        # A worker that exited before this first look is a zombie already: reap it too, or it
        # outlives this process (orphaned zombies wait for init, which may be slow to reap).
        alive, exited = _ray_processes(temp_dir, before)
        seen |= alive | exited
        _reap(seen)
        if not alive:
            break
        if time.monotonic() > deadline:
            if killed:
                log.warning("Ray processes %s did not exit", sorted(alive))
                return
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5.0
        time.sleep(0.2)
    for _ in range(10):  # the last ones may have become zombies just now
        _reap(seen)
        if not seen:
            return
        time.sleep(0.1)
