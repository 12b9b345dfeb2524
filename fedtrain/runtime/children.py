"""Child processes of ``fedtrain server`` / ``fedtrain client``: started, watched, stopped by PID.

Each child runs in its own session (a Ctrl-C in the terminal reaches only the launcher, which
then stops the children in order) and, on Linux, is asked to receive SIGTERM if the launcher
dies without cleaning up (``PR_SET_PDEATHSIG``), so a killed launcher leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

__all__ = [
    "Children",
    "free_port",
    "install_stop_handlers",
    "peak_rss_bytes",
    "pids_matching",
    "stop_flower_apps",
    "stop_processes_using",
    "tail",
]

log = logging.getLogger("fedtrain")

_PR_SET_PDEATHSIG = 1
try:  # loaded up front: the child may not take locks (dlopen) between fork and exec
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory (VmHWM) of a process, from /proc; None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_flower_apps(runtime_port: int | str) -> list[int]:
    """Stop the Flower app processes (ServerApp / ClientApps) attached to the private runtime
    API on 127.0.0.1:``runtime_port``; Flower starts them outside our process tree."""
    return stop_processes_using(f"--runtime-api-address 127.0.0.1:{runtime_port} ")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Children:
    """Named child processes with their logs in ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        out = self.log_path(name).open("ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
        out.close()
        self.procs[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc.pid

    def exited(self) -> tuple[str, int] | None:
        """(name, exit code) of a child that has exited, if any."""
        for name, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None:
                return name, rc
        return None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child (newest first), then SIGKILL what is still running."""
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                log.debug("stopping %s (pid %d)", name, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()


def pids_matching(marker: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose command line contains ``marker``."""
    out = []
    me = os.getpid()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and state != "Z" and int(entry.name) != me:
            out.append(int(entry.name))
    return out


def stop_processes_using(marker: str, timeout_s: float = 10.0) -> list[int]:
    """SIGTERM (then SIGKILL) processes whose command line contains ``marker`` — used for the
    ServerApp processes Flower's SuperExec spawned for OUR SuperLink (the marker is its
    private runtime address, unique to this launcher). Returns their PIDs."""
    pids = pids_matching(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


class Stop(Exception):
    """SIGINT/SIGTERM arrived."""


def install_stop_handlers() -> Callable[[], None]:
    """Turn SIGINT/SIGTERM into :class:`Stop`; return a function restoring the old handlers."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore
