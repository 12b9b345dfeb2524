"""The public address serves the Fleet API and the health check, nothing else, and limits each
client address: a token bucket (429 with Retry-After) and a request body cap (413). The limit
tests run the real uvicorn proxy in front of a real HTTP server on 127.0.0.1, with a fake clock
so refills are exact and instant."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from fedtrain.models.llama import build_model, count_parameters
from fedtrain.models.presets import PRESETS
from fedtrain.server.launcher import max_body_bytes
from fedtrain.server.proxy import FleetProxy, RateLimiter, is_allowed


@pytest.mark.parametrize(
    ("method", "path", "ok"),
    [
        ("POST", "/v1/fleet/pull-messages", True),
        ("POST", "/v1/fleet/push-object", True),
        ("GET", "/health", True),
        ("HEAD", "/health", True),
        ("POST", "/health", False),
        ("POST", "/v1/control/start-run", False),
        ("POST", "/v1/control/register-node", False),
        ("POST", "/v1/runtime/pull-messages", False),
        ("POST", "/v1/fleet/../control/start-run", False),
        ("GET", "/docs", False),
        ("GET", "/", False),
    ],
)
def test_only_fleet_api_passes(method, path, ok):
    assert is_allowed(method, path) is ok


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_exact_on_a_fake_clock():
    clock = FakeClock()
    rl = RateLimiter(rate=2.0, burst=10.0, clock=clock)
    assert [rl.take("a") for _ in range(10)] == [0.0] * 10
    assert rl.take("a") == 0.5  # empty: one token takes 1/rate seconds
    assert rl.take("b") == 0.0  # another address has its own bucket
    clock.now += 0.25
    assert rl.take("a") == 0.25
    clock.now += 0.25
    assert rl.take("a") == 0.0
    clock.now += 3600  # refills to the burst, no further
    assert [rl.take("a") for _ in range(11)] == [0.0] * 10 + [0.5]


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    seen: list[tuple[str, str, int]]

    def _answer(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        self.seen.append((self.command, self.path, n))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    seen: list[tuple[str, str, int]] = []
    handler = type("Handler", (_Upstream,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream):
    """Start a proxy in front of ``upstream`` with the given limits; stopped after the test."""
    started: list[tuple[FleetProxy, httpx.Client]] = []

    def make(**limits: Any) -> tuple[FleetProxy, httpx.Client, FakeClock]:
        clock = FakeClock()
        sock = socket.create_server(("127.0.0.1", 0))
        p = FleetProxy(sock, upstream[0], clock=clock, **limits)
        p.start()
        client = httpx.Client(base_url=f"http://127.0.0.1:{p.port}", timeout=10)
        started.append((p, client))
        upstream[1].clear()
        return p, client, clock

    yield make
    for p, client in started:
        client.close()
        p.stop()


def _pull(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/fleet/pull-messages", content=b"x")


def test_burst_over_the_limit_is_429_then_refill_passes(proxy, upstream, caplog):
    caplog.set_level(logging.WARNING, logger="fedtrain.proxy")
    p, client, clock = proxy(max_requests_per_s=2.0)  # bursts of 5 s worth: 10 requests
    assert [_pull(client).status_code for _ in range(10)] == [200] * 10
    over = _pull(client)
    assert over.status_code == 429
    assert over.headers["retry-after"] == "1"  # 0.5 s to the next token, rounded up
    assert "at most 2/s" in over.json()["detail"]
    assert [_pull(client).status_code for _ in range(3)] == [429] * 3
    assert len(upstream[1]) == 10  # refused requests never reach the SuperLink
    clock.now += 1.0  # two tokens
    assert [_pull(client).status_code for _ in range(3)] == [200, 200, 429]
    assert p.stats()["limited"] == 5 and p.stats()["requests"] == 12
    warnings = [r for r in caplog.records if "rate limited" in r.getMessage()]
    assert len(warnings) == 1  # once per client per 10 s, however many were refused
    clock.now += 10.0
    assert [_pull(client).status_code for _ in range(21)][-1] == 429
    warnings = [r for r in caplog.records if "rate limited" in r.getMessage()]
    assert len(warnings) == 2 and "6 refused in all" in warnings[1].getMessage()


def test_body_over_the_cap_is_413_and_never_forwarded(proxy, upstream):
    p, client, _ = proxy(max_body_bytes=1000)
    assert client.post("/v1/fleet/push-object", content=b"a" * 1000).status_code == 200
    big = client.post("/v1/fleet/push-object", content=b"a" * 1001)  # Content-Length: refused
    assert big.status_code == 413
    assert "over 1000 bytes" in json.loads(big.content)["detail"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: read until the cap, then stop
        yield from (b"b" * 400 for _ in range(5))

    streamed = client.post("/v1/fleet/push-object", content=chunked())
    assert streamed.status_code == 413
    assert [n for _, _, n in upstream[1]] == [1000]
    assert p.stats()["too_large"] == 2 and p.stats()["max_request_bytes"] == 1000


def test_limits_off_never_answer_429_or_413(proxy, upstream):
    p, client, _ = proxy(max_requests_per_s=0.0, max_body_bytes=0)
    codes = {_pull(client).status_code for _ in range(200)}
    assert codes == {200}
    assert client.post("/v1/fleet/push-object", content=b"c" * (2 << 20)).status_code == 200
    assert p.stats()["limited"] == 0 and p.stats()["too_large"] == 0
    assert len(upstream[1]) == 201 and p.stats()["peak_requests_per_s"] == 201


def test_body_cap_is_the_payload_bound_plus_an_envelope(tiny_cfg):
    n = count_parameters(build_model(PRESETS["tiny"], 256, seed=0))  # the byte tokenizer
    assert max_body_bytes(tiny_cfg) == 8 * n + (1 << 20) + (1 << 20)
    tiny_cfg.reliability.max_payload_bytes = 5_000_000
    assert max_body_bytes(tiny_cfg) == 5_000_000 + (1 << 20)
