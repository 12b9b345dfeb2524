"""The coordinator's Flower SuperLink and the Flower CLI around it: the ``flower-superlink``
command line, its health wait, the ``flwr`` settings (``FLWR_HOME/config.toml``), silo key
registration and the app bundle ``flwr run`` submits. Used by :mod:`fedtrain.server.launcher`.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "LaunchError",
    "register_keys",
    "superlink_command",
    "wait_health",
    "write_app",
    "write_flwr_config",
]


class LaunchError(RuntimeError):
    """A child process could not be started or died."""


def superlink_command(home: Path, internal: int, tls: Path | None) -> list[str]:
    """``flower-superlink`` on 127.0.0.1:``internal``, with TLS and node auth when ``tls``."""
    link = [
        "flower-superlink",
        "--database",
        str(home / "superlink.db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(internal),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        link.append("--insecure")
    else:
        link += [
            "--ssl-ca-certfile",
            str(tls / "ca.crt"),
            "--ssl-certfile",
            str(tls / "server.crt"),
            "--ssl-keyfile",
            str(tls / "server.key"),
            "--enable-supernode-auth",
        ]
    return link


def wait_health(
    url: str, ca: Path | None, proc_alive: Callable[[], bool], timeout_s: float = 60.0
) -> None:
    """Poll the SuperLink's ``/health`` until it answers 200; fail if it exits or times out."""
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:  # noqa: S310
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if not proc_alive():
            raise LaunchError("the SuperLink exited while starting")
        time.sleep(0.3)
    raise LaunchError(f"the SuperLink did not become healthy within {timeout_s:.0f}s")


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_flwr_config(home: Path, port: int, ca: Path | None) -> None:
    """``FLWR_HOME/config.toml``: the ``coordinator`` connection the Flower CLI uses."""
    home.mkdir(parents=True, exist_ok=True)
    conn = f'address = "127.0.0.1:{port}"\n'
    conn += f"root-certificates = {_toml_str(str(ca))}\n" if ca else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n{conn}'
    )


def register_keys(env: dict[str, str], tls_dir: Path) -> list[str]:
    """Register every ``tls_dir/silos/NAME/auth_key.pub`` with the SuperLink (``flwr supernode
    register``; one already registered counts as done); return the silo names."""
    done = []
    for pub in sorted(tls_dir.glob("silos/*/auth_key.pub")):
        silo = pub.parent.name
        r = subprocess.run(
            ["flwr", "supernode", "register", str(pub), "coordinator", "--name", silo],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        text = (r.stdout + r.stderr).lower()
        if r.returncode != 0 and "already" not in text:
            raise LaunchError(
                f"registering silo {silo}'s key failed: {(r.stdout + r.stderr)[-400:]}"
            )
        done.append(silo)
    return done


def write_app(app_dir: Path, run_config: dict[str, str | int | float]) -> None:
    """The Flower app bundle ``flwr run`` submits: components only, code comes from fedtrain."""
    app_dir.mkdir(parents=True, exist_ok=True)
    cfg_lines = "\n".join(
        f"{k} = {_toml_str(v) if isinstance(v, str) else v}" for k, v in run_config.items()
    )
    (app_dir / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtrain-run"
version = "1.0.0"
description = "A fedtrain federated training run"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedtrain"

[tool.flwr.app.components]
serverapp = "fedtrain.server.app:app"
clientapp = "fedtrain.client.app:app"

[tool.flwr.app.config]
{cfg_lines}
"""
    )
