"""A fleet-only reverse proxy in front of the SuperLink.

Flower's SuperLink serves its Fleet API (what SuperNodes use), its Control API (run submission,
node registration — no authentication) and its runtime API on ONE HTTP(S) port. The coordinator
therefore binds the SuperLink to loopback and exposes only this proxy on the public address:
requests under ``/v1/fleet/`` (and ``GET /health``) are forwarded, everything else is answered
``403`` without reaching the SuperLink. With TLS the proxy terminates TLS with the SuperLink's
certificate and talks TLS to the SuperLink on loopback; SuperNode authentication headers pass
through unchanged. It also counts the bytes it forwards (request and response bodies), which
is the traffic a silo's link actually carries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn

__all__ = ["FleetProxy", "is_allowed"]

log = logging.getLogger("fedtrain.proxy")

_HOP = {
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
}


def is_allowed(method: str, path: str) -> bool:
    """Only the Fleet API and the health check are reachable from outside."""
    if path.startswith("/v1/fleet/") and ".." not in path:
        return True
    return method in ("GET", "HEAD") and path == "/health"


class FleetProxy:
    """Serve on ``sock`` (already bound), forward allowed requests to ``upstream``."""

    def __init__(
        self,
        sock: socket.socket,
        upstream: str,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        upstream_ca: Path | None = None,
        stats_path: Path | None = None,
    ) -> None:
        self.sock = sock
        self.upstream = upstream.rstrip("/")
        self.stats_path = stats_path
        self.bytes_in = 0
        """Request body bytes forwarded to the SuperLink (silo -> coordinator)."""
        self.bytes_out = 0
        """Response body bytes returned to silos (coordinator -> silo)."""
        self.requests = 0
        self.refused = 0
        self._verify: Any = str(upstream_ca) if upstream_ca else False
        self._client: httpx.AsyncClient | None = None
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            lifespan="off",
            interface="asgi3",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fleet-proxy", daemon=True)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _run(self) -> None:
        self._server.run(sockets=[self.sock])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.write_stats()

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "refused": self.refused,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    def write_stats(self) -> None:
        if self.stats_path is not None:
            self.stats_path.write_text(json.dumps(self.stats()))

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not is_allowed(method, path):
            self.refused += 1
            log.warning("refused %s %s from %s", method, path, scope.get("client"))
            body = json.dumps({"detail": "only the Flower Fleet API is served here"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        self.bytes_in += len(body)
        self.requests += 1
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _HOP
        ]
        if self._client is None:
            self._client = httpx.AsyncClient(verify=self._verify, timeout=None)
        url = (
            self.upstream
            + path
            + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        )
        try:
            req = self._client.build_request(method, url, headers=headers, content=body)
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as e:
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            await send(
                {"type": "http.response.body", "body": f"SuperLink unreachable: {e}".encode()}
            )
            return
        try:
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in resp.headers.multi_items()
                if k.lower() not in _HOP
            ]
            await send(
                {"type": "http.response.start", "status": resp.status_code, "headers": out_headers}
            )
            async for chunk in resp.aiter_raw():
                self.bytes_out += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await resp.aclose()
        if self.requests % 50 == 0:
            await asyncio.to_thread(self.write_stats)
