"""``fedtrain server``: the coordinator's processes, with ``RUN_DIR/server.lock`` held.

1. A Flower SuperLink (:mod:`fedtrain.server.superlink`; ``FLWR_HOME`` and ``--database`` in
   the run directory, runtime dependency installation off) on a private 127.0.0.1 port.
2. With ``--tls-dir`` (made by ``fedtrain keys init``): TLS, SuperNode authentication on, and
   every silo public key in the directory registered, before any silo can connect.
3. The fleet-only proxy (:mod:`fedtrain.server.proxy`) on the public ``--address``: silos reach
   the Fleet API and nothing else (the Control API has no authentication); then
   ``RUN_DIR/address``.
4. ``flwr run`` of a generated app whose components are ``fedtrain.server.app:app`` and
   ``fedtrain.client.app:app``; its log streams to the console, and a failure the ServerApp
   records (``RUN_DIR/failure.txt``) ends the command non-zero with that reason.

Restarting with the same ``--run-dir`` resumes the run from its last committed round (the
SuperLink database keeps the silos' node registrations, so silos reconnect on their own).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fedtrain.runtime.children import (
    Children,
    Stop,
    free_port,
    install_stop_handlers,
    stop_flower_apps,
    tail,
)
from fedtrain.runtime.files import hold_lock, read_since
from fedtrain.server.status_page import StatusServer
from fedtrain.server.superlink import LaunchError, superlink_command, wait_health, write_app
from fedtrain.server.superlink import register_keys as _register_keys
from fedtrain.server.superlink import write_flwr_config as _flwr_config

if TYPE_CHECKING:
    from fedtrain.config import Config
    from fedtrain.server.proxy import FleetProxy

__all__ = [
    "FAILURE_FILE",
    "LaunchError",
    "ServerOptions",
    "check_deployable",
    "record_failure",
    "run_server",
]

log = logging.getLogger("fedtrain")

FAILURE_FILE = "failure.txt"
"""Written in the run directory by the ServerApp when the run fails: the reason, one line.
The launcher removes it at start and reports it when the run ends without a summary."""

LOCK_FILE = "server.lock"
"""Held (``flock``) by the live ``fedtrain server`` of a run directory; holds its pid."""


@dataclass(slots=True)
class ServerOptions:
    config: Path | None
    run_dir: Path | None
    address: str = "127.0.0.1:9092"
    tls_dir: Path | None = None
    overrides: tuple[str, ...] = ()
    join_timeout_s: float = 600.0
    status_port: int | None = None
    """Serve the live status page on 127.0.0.1:PORT (0: any free port); None: no page."""


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address must be HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def record_failure(run_dir: Path, reason: str) -> None:
    """Leave why the run failed for the launcher (temp + rename: never read half-written)."""
    tmp = run_dir / (FAILURE_FILE + ".tmp")
    tmp.write_text(" ".join(reason.split()) + "\n")
    tmp.replace(run_dir / FAILURE_FILE)


def _read_failure(run_dir: Path) -> str | None:
    try:
        return (run_dir / FAILURE_FILE).read_text().strip() or None
    except OSError:
        return None


def max_body_bytes(cfg: Config) -> int:
    """Largest request body the fleet proxy accepts for this run: the update size bound
    (``reliability.max_payload_bytes``, or the auto bound for the run's model) plus 1 MiB for
    Flower's message envelope. Flower moves payloads in 5 MiB chunks, so this is loose for a
    healthy silo and only stops absurd bodies."""
    import torch

    from fedtrain.data.prepare import configured_tokenizer
    from fedtrain.data.tokenizer import ByteTokenizer, load_tokenizer
    from fedtrain.models.llama import Llama, count_parameters
    from fedtrain.models.presets import PRESETS
    from fedtrain.server.validate import default_max_payload_bytes

    bound = cfg.reliability.max_payload_bytes
    if not bound:
        # The BPE tokenizer is trained by the ServerApp later; its size is at most the
        # configured vocab_size, so this bound is never below the real model's.
        given = configured_tokenizer(cfg)
        if given is not None:
            vocab = load_tokenizer(given).vocab_size
        else:
            vocab = (
                ByteTokenizer().vocab_size if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
            )
        with torch.device("meta"):  # shapes only: no memory, no init
            model = Llama(PRESETS[cfg.model.preset], vocab, cfg.model.tie_embeddings)
        bound = default_max_payload_bytes(count_parameters(model))
    return int(bound) + (1 << 20)


def check_deployable(cfg: Config) -> None:
    """Refuse, before anything starts, a strategy that cannot run in deployment."""
    from fedtrain.server.deploy import check_deployable as check

    check(cfg)


def _load_run(opts: ServerOptions) -> tuple[Path, Config, Path]:
    """The config file, its loaded config and the run directory; refuses what cannot be
    deployed."""
    from fedtrain.config import load_config, packaged_example

    config_path = opts.config or packaged_example("deploy")
    cfg = load_config(config_path, list(opts.overrides), purpose="deploy")
    check_deployable(cfg)
    run_dir = (opts.run_dir or Path("runs") / cfg.run.name).resolve()
    return Path(config_path), cfg, run_dir


def _check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse a finished run and a run directory holding a different config."""
    from fedtrain.config import config_sha256, load_config

    if (run_dir / "summary.json").exists():
        raise ValueError(f"{run_dir}: the run already finished; choose another --run-dir")
    if (run_dir / "config.toml").exists():
        started = load_config(run_dir / "config.toml", purpose="deploy")
        if config_sha256(started) != config_sha256(cfg):
            raise ValueError(
                f"{run_dir} holds a run with a different config; choose another --run-dir"
            )
        print(f"fedtrain server: resuming the run in {run_dir}", flush=True)


def _lock_run_dir(run_dir: Path) -> IO[str]:
    """Hold ``run_dir/server.lock`` for this process's lifetime (the kernel drops it when the
    process dies, however it dies); refuse while another live ``fedtrain server`` holds it."""
    path = run_dir / LOCK_FILE
    f = hold_lock(path)
    if f is None:
        pid = path.read_text().strip() or "unknown"
        raise ValueError(
            f"{run_dir} is in use by a running `fedtrain server` (pid {pid}, lock {path}); "
            "stop it first or choose another --run-dir"
        )
    return f


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
    """Stop the ServerApp a coordinator killed without cleaning up left behind. Called with
    the run directory's lock held, so that coordinator's launcher is dead."""
    if port_file.exists():
        # A coordinator killed without cleaning up leaves its ServerApp running (Flower starts
        # it outside our process tree); it still holds the run. Stop exactly those processes:
        # they are the ones attached to the previous SuperLink's private address.
        old = port_file.read_text().strip()
        if stop_flower_apps(old):
            print(
                "fedtrain server: stopped the ServerApp a killed coordinator left running",
                flush=True,
            )


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


def _prepare_flwr(env: dict[str, str], home: Path, internal: int, tls: Path | None) -> None:
    """The Flower CLI settings and, with TLS, every silo key registered. Runs before the
    public port opens: a silo reaching the Fleet API with a key not registered yet would be
    refused (Flower's node authentication gives no second chance)."""
    _flwr_config(home, internal, tls / "ca.crt" if tls else None)
    if tls is not None:
        silos = _register_keys({**os.environ, **env}, tls)
        print(f"fedtrain server: registered silo keys: {', '.join(silos) or 'none'}", flush=True)


def _submit_run(
    opts: ServerOptions,
    children: Children,
    env: dict[str, str],
    config_path: Path,
    run_dir: Path,
    tls: Path | None,
) -> int:
    """Write the app bundle and start ``flwr run``; return where this start's log begins."""
    home = run_dir / "flwr"
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
    log_path = children.log_path("run")
    start = log_path.stat().st_size if log_path.exists() else 0
    children.start("run", ["flwr", "run", str(home / "app"), "coordinator", "--stream"], env)
    return start


def run_server(opts: ServerOptions) -> int:
    """Start everything, stream the run's log, stop everything; return an exit code."""
    host, port = _parse_address(opts.address)
    tls = _tls_dir(opts)
    config_path, cfg, run_dir = _load_run(opts)
    lock = _lock_run_dir(run_dir)
    try:
        _check_run_dir(run_dir, cfg)
        return _serve(opts, config_path, cfg, run_dir, (host, port), tls)
    finally:
        lock.close()  # releases the flock


def _serve(
    opts: ServerOptions,
    config_path: Path,
    cfg: Config,
    run_dir: Path,
    address: tuple[str, int],
    tls: Path | None,
) -> int:
    """The coordinator's processes, in order, with the run directory locked."""
    home = run_dir / "flwr"
    env = {"FLWR_HOME": str(home)}
    children = Children(run_dir / "logs")
    restore = install_stop_handlers()
    proxy = status = None
    rc = 1
    internal = free_port()
    port_file = home / "superlink.port"
    _stop_previous_serverapp(port_file)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # a previous start's
    home.mkdir(parents=True, exist_ok=True)
    port_file.write_text(str(internal))
    try:
        children.start("superlink", superlink_command(home, internal, tls), env)
        upstream = f"{'https' if tls else 'http'}://127.0.0.1:{internal}"
        alive = children.procs["superlink"].poll
        wait_health(upstream + "/health", tls / "ca.crt" if tls else None, lambda: alive() is None)
        _prepare_flwr(env, home, internal, tls)
        proxy = _start_proxy(cfg, address, upstream, tls, run_dir)
        print(
            f"fedtrain server: fleet API on {address[0]}:{proxy.port} "
            f"({'TLS' if tls else 'insecure'}); control API kept on 127.0.0.1:{internal}; "
            f"run dir {run_dir}",
            flush=True,
        )
        if opts.status_port is not None:
            status = StatusServer(run_dir, opts.status_port).start()
            print(f"fedtrain server: status page {status.url}", flush=True)
        start = _submit_run(opts, children, env, config_path, run_dir, tls)
        rc = _follow(children, run_dir, start)
    except Stop as e:
        print(f"fedtrain server: {e} received, stopping", flush=True)
        rc = 130
    finally:
        if proxy is not None:
            proxy.stop()
        if status is not None:
            status.stop()
        children.stop()
        # The ServerApp runs under Flower's SuperExec, outside our process tree's reach.
        stop_flower_apps(internal)
        restore()
    return rc


FAILED_GRACE_S = 5.0
"""After the ServerApp recorded a failure, how long ``flwr run`` may keep streaming its last
lines (it otherwise waits about a minute for the SuperLink to mark the run finished)."""


def _follow(children: Children, run_dir: Path, pos: int) -> int:
    """Echo the run's log from ``pos`` until ``flwr run`` exits or the ServerApp records a
    failure; fail if the SuperLink dies first."""
    log_path = children.log_path("run")
    failed_at: float | None = None
    while True:
        pos = _echo(log_path, pos)
        dead: tuple[str, int | None] | None = children.exited()
        if failed_at is None and _read_failure(run_dir) is not None:
            failed_at = time.monotonic()
        if dead is None and failed_at is not None:
            if time.monotonic() - failed_at > FAILED_GRACE_S:
                dead = ("run", None)
        if dead is not None:
            _echo(log_path, pos)
            return _ended(children, run_dir, *dead)
        time.sleep(0.3)


def _ended(children: Children, run_dir: Path, name: str, code: int | None) -> int:
    """Report how the run ended (on the terminal and in the run's log); the exit code."""
    log_path = children.log_path("run")
    if name != "run":
        _report(
            log_path,
            f"{name} exited with code {code}:\n" + tail(children.log_path(name)),
        )
        return 1
    if (run_dir / "summary.json").exists():
        print(f"fedtrain server: run finished; outputs in {run_dir}", flush=True)
        return 0
    reason = _read_failure(run_dir)
    if reason is not None:
        _report(log_path, f"the run failed: {reason}")
    else:
        status = "still running" if code is None else f"exit {code}"
        _report(log_path, f"the run ended without a summary (flwr run {status}); see {log_path}")
    return 1


def _report(log_path: Path, message: str) -> None:
    """A launcher error: on stderr and appended to the run's log."""
    line = f"fedtrain server: {message}"
    print(line, file=sys.stderr, flush=True)
    try:
        with log_path.open("a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def _echo(path: Path, pos: int) -> int:
    data = read_since(path, pos)
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(data)
