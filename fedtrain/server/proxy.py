"""A fleet-only reverse proxy in front of the SuperLink.

Flower's SuperLink serves its Fleet API (what SuperNodes use), its Control API (run submission,
node registration — no authentication) and its runtime API on ONE HTTP(S) port. The coordinator
therefore binds the SuperLink to loopback and exposes only this proxy on the public address:
requests under ``/v1/fleet/`` (and ``GET /health``) are forwarded, everything else is answered
``403`` without reaching the SuperLink. With TLS the proxy terminates TLS with the SuperLink's
certificate and talks TLS to the SuperLink on loopback; SuperNode authentication headers pass
through unchanged. It also counts the bytes it forwards (request and response bodies), which
is the traffic a silo's link actually carries.

Two limits apply per request, before anything reaches the SuperLink: a token bucket per client
address (``429`` with ``Retry-After`` when it is empty) and a cap on the request body (``413``,
read incrementally and abandoned at the cap). Flower's SuperNode treats neither as retryable,
so the run config's defaults must stay well above what a healthy silo sends (see
``ReliabilitySection.max_requests_per_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

__all__ = ["FleetProxy", "RateLimiter", "is_allowed"]

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


class RateLimiter:
    """Token buckets keyed by client address: ``rate`` tokens per second, ``burst`` at most.

    Each request takes one token; an empty bucket refuses. Buckets that have refilled are
    forgotten (at most once a second, once there are many), so a flood from many addresses
    cannot grow memory without bound.
    """

    _PRUNE_AT = 4096

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time)
        self._pruned = -math.inf

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when granted, else the seconds until one is free."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._PRUNE_AT and now - self._pruned >= 1.0:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        self._pruned = now
        full = [
            k
            for k, (t, then) in self._buckets.items()
            if t + (now - then) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]


class _Disconnected(Exception):
    """The client went away before its request body was complete."""


async def _reply(
    send: Any, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FleetProxy:
    """Serve on ``sock`` (already bound), forward allowed requests to ``upstream``.

    ``max_requests_per_s`` limits each client address (bursts of 5 s worth; 0 = no limit);
    ``max_body_bytes`` caps a request body (0 = no cap).
    """

    BURST_S = 5.0
    """A client address may send this many seconds' worth of requests at once."""
    LOG_EVERY_S = 10.0
    """At most one 'rate limited' warning per client address in this many seconds."""

    def __init__(
        self,
        sock: socket.socket,
        upstream: str,
        *,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        upstream_ca: Path | None = None,
        stats_path: Path | None = None,
        max_requests_per_s: float = 0.0,
        max_body_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_requests_per_s < 0 or max_body_bytes < 0:
            raise ValueError(
                "max_requests_per_s and max_body_bytes must be >= 0 (0 = no limit), got "
                f"{max_requests_per_s} and {max_body_bytes}"
            )
        self.sock = sock
        self.upstream = upstream.rstrip("/")
        self.stats_path = stats_path
        self.bytes_in = 0
        """Request body bytes forwarded to the SuperLink (silo -> coordinator)."""
        self.bytes_out = 0
        """Response body bytes returned to silos (coordinator -> silo)."""
        self.requests = 0
        self.refused = 0
        self.limited = 0
        """Requests answered 429 (the client address was over its rate)."""
        self.too_large = 0
        """Requests answered 413 (body over ``max_body_bytes``)."""
        self.max_request_bytes = 0
        """Largest request body forwarded."""
        self.peak_requests_per_s = 0
        """Most requests one client address sent within one clock second (the load to size
        ``max_requests_per_s`` against)."""
        self.max_body_bytes = max_body_bytes
        self.max_requests_per_s = max_requests_per_s
        self._clock = clock
        self._limiter = (
            RateLimiter(max_requests_per_s, max(1.0, self.BURST_S * max_requests_per_s), clock)
            if max_requests_per_s > 0
            else None
        )
        self._second: dict[str, int] = {}  # client -> requests in the current clock second
        self._swept = -1
        self._warned: dict[str, float] = {}  # client -> time of its last warning
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
            "limited": self.limited,
            "too_large": self.too_large,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "max_request_bytes": self.max_request_bytes,
            "peak_requests_per_s": self.peak_requests_per_s,
        }

    def write_stats(self) -> None:
        if self.stats_path is not None:
            self.stats_path.write_text(json.dumps(self.stats()))

    def _count(self, client: str) -> None:
        now = self._clock()
        second = int(now)
        if second != self._swept:  # a new second: forget the last one and quiet clients
            self._swept = second
            self._second.clear()
            self._warned = {k: t for k, t in self._warned.items() if now - t < self.LOG_EVERY_S}
        n = self._second[client] = self._second.get(client, 0) + 1
        self.peak_requests_per_s = max(self.peak_requests_per_s, n)

    async def _limit(self, client: str, method: str, path: str, send: Any) -> bool:
        """Answer 429 and return True when ``client`` is over its rate."""
        if self._limiter is None:
            return False
        wait = self._limiter.take(client)
        if wait <= 0:
            return False
        self.limited += 1
        now = self._clock()
        if now - self._warned.get(client, -math.inf) >= self.LOG_EVERY_S:
            self._warned[client] = now
            log.warning(
                "rate limited %s (%s %s): over %g requests/s; %d refused in all so far",
                client,
                method,
                path,
                self.max_requests_per_s,
                self.limited,
            )
        retry = max(1, math.ceil(wait))
        await _reply(
            send,
            429,
            f"too many requests from {client}: at most {self.max_requests_per_s:g}/s "
            f"(bursts of {self.BURST_S * self.max_requests_per_s:g}); retry in {retry} s",
            [(b"retry-after", str(retry).encode())],
        )
        return True

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes | None:
        """The request body, or None once it exceeds ``max_body_bytes`` (reading stops)."""
        cap = self.max_body_bytes
        if cap:
            for k, v in scope["headers"]:
                if k.lower() == b"content-length" and v.strip().isdigit() and int(v) > cap:
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk = msg.get("body", b"")
            size += len(chunk)
            if cap and size > cap:
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        return b"".join(chunks)

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry: rate limit, Fleet-API allow list and body cap, then forward."""
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        client = str(scope["client"][0]) if scope.get("client") else ""
        self._count(client)
        if await self._limit(client, method, path, send):
            return
        if not is_allowed(method, path):
            self.refused += 1
            log.warning("refused %s %s from %s", method, path, scope.get("client"))
            await _reply(send, 403, "only the Flower Fleet API is served here")
            return
        try:
            body = await self._read_body(scope, receive)
        except _Disconnected:
            return
        if body is None:
            await self._too_large(client, method, path, send)
            return
        self.bytes_in += len(body)
        self.max_request_bytes = max(self.max_request_bytes, len(body))
        self.requests += 1
        if await self._forward(scope, body, send) and self.requests % 50 == 0:
            await asyncio.to_thread(self.write_stats)

    async def _too_large(self, client: str, method: str, path: str, send: Any) -> None:
        """Count, log and answer 413 for a request body over ``max_body_bytes``."""
        self.too_large += 1
        log.warning(
            "refused %s %s from %s: body over %d bytes",
            method,
            path,
            client,
            self.max_body_bytes,
        )
        # The rest of the body is never read: close the connection rather than drain it.
        await _reply(
            send,
            413,
            f"request body over {self.max_body_bytes} bytes",
            [(b"connection", b"close")],
        )

    async def _forward(self, scope: dict[str, Any], body: bytes, send: Any) -> bool:
        """Send the request to the SuperLink and stream its response back; hop-by-hop headers
        are dropped both ways. False (after answering 502) when the SuperLink is unreachable."""
        method, path = scope["method"], scope["path"]
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
            return False
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
        return True
