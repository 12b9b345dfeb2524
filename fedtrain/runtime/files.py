"""Files shared between processes: a log read from an offset, a lock held for a lifetime."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

__all__ = ["file_size", "hold_lock", "read_since"]


def file_size(path: Path) -> int:
    """Bytes in ``path`` now (0 when it does not exist yet)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_since(path: Path, offset: int) -> bytes:
    """What was appended to ``path`` after ``offset`` (empty when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


def hold_lock(path: Path, wait_s: float = 0.0) -> IO[str] | None:
    """Take an exclusive ``flock`` on ``path``, waiting up to ``wait_s``; write this process's
    pid into it. Returns the open file (the lock lasts until it is closed or the process dies,
    however it dies), or None while another process holds it (its pid is in the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.5)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
