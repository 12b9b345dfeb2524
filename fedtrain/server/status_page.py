"""``fedtrain server --status-port P``: a live status page of the run, on 127.0.0.1 only.

``/`` is one self-contained HTML page (no external scripts or fonts: a coordinator may have no
internet) that polls ``/status.json`` every two seconds and draws the silo table and the loss
and bytes charts; ``/status.json`` is :func:`fedtrain.storage.status.run_status`, as
``fedtrain status --json`` prints it. Each request reads the run index read-only, so the page
never holds up the coordinator. Bound to loopback: reach it from elsewhere through an SSH
tunnel, not by exposing it.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["StatusServer"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.page)
        elif path == "/status.json":
            from fedtrain.storage.status import run_status

            try:
                body = json.dumps(run_status(self.server.run_dir))
                self._send(200, "application/json", body.encode())
            except Exception as e:  # the run dir mid-creation, a locked index: say so, retry
                err = json.dumps({"error": f"{type(e).__name__}: {e}"})
                self._send(503, "application/json", err.encode())
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("status page: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    run_dir: Path
    page: bytes


class StatusServer:
    """Serves the status of ``run_dir`` on 127.0.0.1:``port`` (0: any free port) in a thread."""

    def __init__(self, run_dir: Path, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"--status-port must be in [0, 65535], got {port}")
        try:
            self._httpd = _Server((HOST, port), _Handler)
        except OSError as e:
            raise ValueError(f"--status-port {port}: cannot listen on {HOST}: {e}") from None
        self._httpd.run_dir = Path(run_dir)
        self._httpd.page = resources.files("fedtrain.server").joinpath("status.html").read_bytes()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fedtrain-status", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._httpd.server_address[1]}/"

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
