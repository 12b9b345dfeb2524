"""The public address serves the Fleet API and the health check, nothing else."""

from __future__ import annotations

import pytest

from fedtrain.server.proxy import is_allowed


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
