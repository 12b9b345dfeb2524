"""``fedtrain server``: the coordinator's processes.

1. A Flower SuperLink (subprocess, ``FLWR_HOME`` and ``--database`` in the run directory,
   runtime dependency installation off) bound to 127.0.0.1 on a private port.
2. The fleet-only proxy (:mod:`fedtrain.server.proxy`) on the public ``--address``: silos reach
   the Fleet API and nothing else (the Control API has no authentication).
3. With ``--tls-dir`` (made by ``fedtrain keys init``): TLS on both, SuperNode authentication
   on, and every silo public key found in the directory registered.
4. ``flwr run`` of a generated app whose components are ``fedtrain.server.app:app`` and
   ``fedtrain.client.app:app``; its log streams to the console.

Restarting with the same ``--run-dir`` resumes the run from its last committed round (the
SuperLink database keeps the silos' node registrations, so silos reconnect on their own).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    stop_processes_using,
    tail,
)

if TYPE_CHECKING:
    from fedtrain.config import Config
    from fedtrain.server.proxy import FleetProxy

__all__ = ["ServerOptions", "check_deployable", "run_server"]

log = logging.getLogger("fedtrain")


class LaunchError(RuntimeError):
    """A child process could not be started or died."""


@dataclass(slots=True)
class ServerOptions:
    config: Path | None
    run_dir: Path | None
    address: str = "127.0.0.1:9092"
    tls_dir: Path | None = None
    overrides: tuple[str, ...] = ()
    join_timeout_s: float = 600.0


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _wait_health(
    url: str, ca: Path | None, proc_alive: Callable[[], bool], timeout_s: float = 60.0
) -> None:
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


def max_body_bytes(cfg: Config) -> int:
    """Largest request body the fleet proxy accepts for this run: the update size bound
    (``reliability.max_payload_bytes``, or the auto bound for the run's model) plus 1 MiB for
    Flower's message envelope. Flower moves payloads in 5 MiB chunks, so this is loose for a
    healthy silo and only stops absurd bodies."""
    import torch

    from fedtrain.data.tokenizer import ByteTokenizer
    from fedtrain.models.llama import Llama, count_parameters
    from fedtrain.models.presets import PRESETS
    from fedtrain.server.validate import default_max_payload_bytes

    bound = cfg.reliability.max_payload_bytes
    if not bound:
        # The BPE tokenizer is trained by the ServerApp later; its size is at most the
        # configured vocab_size, so this bound is never below the real model's.
        vocab = ByteTokenizer.vocab_size if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
        with torch.device("meta"):  # shapes only: no memory, no init
            model = Llama(PRESETS[cfg.model.preset], vocab, cfg.model.tie_embeddings)
        bound = default_max_payload_bytes(count_parameters(model))
    return int(bound) + (1 << 20)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


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


def _flwr_config(home: Path, port: int, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    conn = f'address = "127.0.0.1:{port}"\n'
    conn += f"root-certificates = {_toml_str(str(ca))}\n" if ca else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n{conn}'
    )


def _register_keys(env: dict[str, str], tls_dir: Path) -> list[str]:
    import subprocess

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


def check_deployable(cfg: Config) -> None:
    """Refuse, before anything starts, a strategy that cannot run in deployment."""
    from fedtrain.strategies.registry import setting, spec_for

    spec = spec_for(cfg)
    if "deploy" not in spec.engines:
        raise ValueError(
            f"{setting(spec, cfg)}: strategy {spec.name!r} is not available in deployment "
            f"(it runs on: {', '.join(sorted(spec.engines))}); use `fedtrain simulate`"
        )


def _resolve_run(opts: ServerOptions) -> tuple[Path, Config, Path]:
    """The config file, its loaded config and the run directory; refuses what cannot be
    deployed, a finished run and a run directory holding a different config."""
    from fedtrain.config import config_sha256, load_config, packaged_example

    config_path = opts.config or packaged_example("deploy")
    cfg = load_config(config_path, list(opts.overrides), purpose="deploy")
    check_deployable(cfg)
    run_dir = (opts.run_dir or Path("runs") / cfg.run.name).resolve()
    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir}: the run already finished; choose another --run-dir")
    if (run_dir / "config.toml").exists():
        started = load_config(run_dir / "config.toml")
        if config_sha256(started) != config_sha256(cfg):
            raise ValueError(
                f"{run_dir} holds a run with a different config; choose another --run-dir"
            )
        print(f"fedtrain server: resuming the run in {run_dir}", flush=True)
    return Path(config_path), cfg, run_dir


def _tls_dir(opts: ServerOptions) -> Path | None:
    """The resolved ``--tls-dir`` (None without one); refuses one missing a server file."""
    tls = opts.tls_dir.resolve() if opts.tls_dir is not None else None
    if tls is not None:
        for f in ("ca.crt", "server.crt", "server.key"):
            if not (tls / f).exists():
                raise ValueError(
                    f"--tls-dir {tls}: {f} missing (make it with `fedtrain keys init`)"
                )
    return tls


def _stop_previous_serverapp(port_file: Path) -> None:
    """Stop the ServerApp a coordinator killed without cleaning up left behind."""
    if port_file.exists():
        # A coordinator killed without cleaning up leaves its ServerApp running (Flower starts
        # it outside our process tree); it still holds the run. Stop exactly those processes:
        # they are the ones attached to the previous SuperLink's private address.
        old = port_file.read_text().strip()
        if stop_processes_using(f"--runtime-api-address 127.0.0.1:{old} "):
            print("fedtrain server: stopped the previous coordinator's ServerApp", flush=True)


def _superlink_command(home: Path, internal: int, tls: Path | None) -> list[str]:
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


def _start_proxy(
    cfg: Config, address: tuple[str, int], upstream: str, tls: Path | None, run_dir: Path
) -> FleetProxy:
    """Start the fleet-only proxy on the public address and write it to ``run_dir/address``."""
    from fedtrain.server.proxy import FleetProxy

    host, port = address
    sock = socket.create_server((host, port), reuse_port=False)
    proxy = FleetProxy(
        sock,
        upstream,
        certfile=tls / "server.crt" if tls else None,
        keyfile=tls / "server.key" if tls else None,
        upstream_ca=tls / "ca.crt" if tls else None,
        stats_path=run_dir / "fleet-traffic.json",
        max_requests_per_s=cfg.reliability.max_requests_per_s,
        max_body_bytes=max_body_bytes(cfg),
    )
    proxy.start()
    (run_dir / "address").write_text(f"{host}:{proxy.port}\n")
    return proxy


def _submit_run(
    opts: ServerOptions,
    children: Children,
    env: dict[str, str],
    config_path: Path,
    run_dir: Path,
    tls: Path | None,
) -> None:
    """Register the silos' keys (with TLS), write the app bundle and start ``flwr run``."""
    import os

    home = run_dir / "flwr"
    if tls is not None:
        silos = _register_keys({**os.environ, **env}, tls)
        print(f"fedtrain server: registered silo keys: {', '.join(silos) or 'none'}", flush=True)
    write_app(
        home / "app",
        {
            "config": str(config_path.resolve()),
            "run-dir": str(run_dir),
            "set": "; ".join(opts.overrides),
            "join-timeout": opts.join_timeout_s,
            "keys-dir": str(tls.resolve()) if tls else "",
        },
    )
    children.start("run", ["flwr", "run", str(home / "app"), "coordinator", "--stream"], env)


def run_server(opts: ServerOptions) -> int:
    """Start everything, stream the run's log, stop everything; return an exit code."""
    config_path, cfg, run_dir = _resolve_run(opts)
    host, port = _parse_address(opts.address)
    tls = _tls_dir(opts)
    run_dir.mkdir(parents=True, exist_ok=True)
    home = run_dir / "flwr"
    env = {"FLWR_HOME": str(home)}
    children = Children(run_dir / "logs")
    restore = install_stop_handlers()
    proxy = None
    rc = 1
    internal = free_port()
    port_file = home / "superlink.port"
    _stop_previous_serverapp(port_file)
    home.mkdir(parents=True, exist_ok=True)
    port_file.write_text(str(internal))
    try:
        children.start("superlink", _superlink_command(home, internal, tls), env)
        scheme = "https" if tls else "http"
        upstream = f"{scheme}://127.0.0.1:{internal}"
        ca = tls / "ca.crt" if tls else None
        _wait_health(upstream + "/health", ca, lambda: children.procs["superlink"].poll() is None)
        proxy = _start_proxy(cfg, (host, port), upstream, tls, run_dir)
        print(
            f"fedtrain server: fleet API on {host}:{proxy.port} ({'TLS' if tls else 'insecure'}); "
            f"control API kept on 127.0.0.1:{internal}; run dir {run_dir}",
            flush=True,
        )
        _flwr_config(home, internal, ca)
        _submit_run(opts, children, env, config_path, run_dir, tls)
        rc = _follow(children, run_dir)
    except Stop as e:
        print(f"fedtrain server: {e} received, stopping", flush=True)
        rc = 130
    finally:
        if proxy is not None:
            proxy.stop()
        children.stop()
        # The ServerApp runs under Flower's SuperExec, outside our process tree's reach.
        stop_processes_using(f"--runtime-api-address 127.0.0.1:{internal} ")
        restore()
    return rc


def _follow(children: Children, run_dir: Path) -> int:
    """Echo the run's log until ``flwr run`` exits; fail if the SuperLink dies first."""
    log_path = children.log_path("run")
    pos = 0
    while True:
        pos = _echo(log_path, pos)
        dead = children.exited()
        if dead is not None:
            name, code = dead
            pos = _echo(log_path, pos)
            if name != "run":
                print(
                    f"fedtrain server: {name} exited with code {code}:\n"
                    + tail(children.log_path(name)),
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            if (run_dir / "summary.json").exists():
                print(f"fedtrain server: run finished; outputs in {run_dir}", flush=True)
                return 0
            print(
                f"fedtrain server: the run ended without a summary (flwr run exit {code}); "
                f"see {log_path}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(0.3)


def _echo(path: Path, pos: int) -> int:
    try:
        with path.open("rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(data)
