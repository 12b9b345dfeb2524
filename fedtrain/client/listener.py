"""The silo daemon's Unix-socket server: one framed request per connection, one answer.

Frames are :mod:`fedtrain.protocol.localapi`'s. The socket is private to the silo's user
(mode 0600); the loop ends when the launcher that started the daemon is gone or asks it
to shut down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Handler", "serve_socket"]

log = logging.getLogger("fedtrain.daemon")

Handler = Callable[[dict[str, Any], dict[str, bytes]], tuple[dict[str, Any], dict[str, bytes]]]
"""A request's header and blobs in, the reply's header and blobs out."""


def serve_socket(
    path: str,
    ready_file: str,
    parent_pid: int,
    handle: Handler,
    silo: str = "",
    done: Callable[[], bool] | None = None,
) -> None:
    """Listen on ``path``, write this process's pid to ``ready_file`` once listening, and answer
    each request with ``handle`` until ``parent_pid`` (when set) has exited or, after a request,
    ``done()`` is true (a ``shutdown`` request)."""
    from fedtrain.protocol.localapi import LocalAPIError, read_frame, write_frame

    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(8)
    srv.settimeout(1.0)
    Path(ready_file).write_text(str(os.getpid()))
    log.info("silo %s trainer daemon listening on %s", silo, path)
    while True:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            if parent_pid and not _alive(parent_pid):
                log.info("launcher %d is gone; stopping", parent_pid)
                return
            continue
        with conn:
            conn.settimeout(None)
            try:
                header, blobs = read_frame(conn)
            except LocalAPIError as e:
                log.warning("bad request on the local socket: %s", e)
                continue
            reply, out = handle(header, blobs)
            try:
                write_frame(conn, reply, out)
            except OSError as e:
                log.warning("could not answer the mailbox: %s", e)
        if done is not None and done():
            log.info("silo %s trainer daemon: shutdown requested; stopping", silo)
            srv.close()
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
