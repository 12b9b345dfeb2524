"""``fedtrain server`` and ``fedtrain client``: a real deployment on Flower."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["client", "server"]


def server(
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config", "-c", help="Run config (TOML). Default: the packaged deploy example."
        ),
    ] = None,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            help="Public HOST:PORT silos connect to (Fleet API only); pass 0.0.0.0:9092 "
            "to accept silos on other machines.",
        ),
    ] = "127.0.0.1:9092",
    tls_dir: Annotated[
        Optional[Path],
        typer.Option("--tls-dir", help="Directory from `fedtrain keys init`: TLS + node auth on."),
    ] = None,
    run_dir: Annotated[
        Optional[Path],
        typer.Option("--run-dir", help="Run directory (default runs/<name>); reused = resumed."),
    ] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    join_timeout: Annotated[
        float, typer.Option("--join-timeout", help="Seconds to wait for every silo to join.")
    ] = 600.0,
    status_port: Annotated[
        Optional[int],
        typer.Option(
            "--status-port",
            help="Serve a live status page (and /status.json) on 127.0.0.1:PORT; 0: any free "
            "port (printed).",
        ),
    ] = None,
) -> None:
    """Coordinate a federated run: SuperLink, fleet-only proxy, and the fedtrain ServerApp."""
    with user_errors(ValueError, RuntimeError, OSError):
        from fedtrain.server.launcher import ServerOptions, run_server

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        opts = ServerOptions(
            config=config,
            run_dir=run_dir,
            address=address,
            tls_dir=tls_dir,
            overrides=tuple(set_ or []),
            join_timeout_s=join_timeout,
            status_port=status_port,
        )
        rc = run_server(opts)
    if rc:
        raise typer.Exit(rc)


def client(
    silo: Annotated[str, typer.Option("--silo", help="This silo's name in the run (e.g. silo0).")],
    server_address: Annotated[str, typer.Option("--server", help="The coordinator's HOST:PORT.")],
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="This silo's own text: path, glob or fsspec URL."),
    ] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Local processes (GPUs) the model is sharded over.")
    ] = 1,
    work_dir: Annotated[
        Optional[Path],
        typer.Option("--work-dir", help="Silo state and logs (default ./fedtrain-silo-NAME)."),
    ] = None,
    tls_ca: Annotated[
        Optional[Path], typer.Option("--tls-ca", help="The run's CA certificate (TLS on).")
    ] = None,
    auth_key: Annotated[
        Optional[Path],
        typer.Option("--auth-key", help="EC private key for Flower node authentication."),
    ] = None,
    signing_key: Annotated[
        Optional[Path],
        typer.Option("--signing-key", help="Ed25519 private key that signs this silo's updates."),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", help="Torch threads per process (0: cores / nproc).")
    ] = 0,
    stay: Annotated[
        bool, typer.Option("--stay", help="Keep serving after a run finishes (the next run).")
    ] = False,
) -> None:
    """Join a run as a silo: the trainer daemon (torchrun, FSDP) and a Flower SuperNode."""
    with user_errors(ValueError, RuntimeError, OSError):
        from fedtrain.client.launcher import ClientOptions, run_client

        rc = run_client(
            ClientOptions(
                silo=silo,
                server=server_address,
                data=data,
                nproc=nproc,
                work_dir=work_dir,
                tls_ca=tls_ca,
                auth_key=auth_key,
                signing_key=signing_key,
                threads=threads,
                stay=stay,
            )
        )
    if rc:
        raise typer.Exit(rc)
