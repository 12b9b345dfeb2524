"""``fedtrain keys init|add|silo``: certificates and keys for a deployment.

``init`` makes a run's CA, the SuperLink certificate and keys for the silos named; ``add``
adds a silo to that directory later (fresh keys, or only the public halves a silo made itself
with ``silo``). Private keys are written with mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Certificates and keys for a deployment.", no_args_is_help=True)


def _silo_flags(directory: Path, silo: str) -> str:
    return (
        f"  silo {silo}: --tls-ca {directory}/ca.crt --auth-key {directory}/silos/{silo}/auth_key"
        f" --signing-key {directory}/silos/{silo}/sign_key"
    )


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the keys.")],
    silo: Annotated[
        list[str], typer.Option("--silo", help="A silo to make keys for (repeatable).")
    ],
    san: Annotated[
        Optional[list[str]],
        typer.Option("--san", help="Host name or IP silos use to reach the coordinator."),
    ] = None,
    days: Annotated[int, typer.Option("--days", help="Certificate validity.")] = 365,
) -> None:
    """Create a CA, the SuperLink certificate and per-silo auth and signing keys."""
    with user_errors(ValueError, OSError):
        from fedtrain.transport.keys import init_keys

        files = init_keys(directory, list(san or []), list(silo), days)
        typer.echo(f"wrote {len(files)} files to {directory}")
        typer.echo(f"  coordinator: fedtrain server --tls-dir {directory} ...")
        for s in silo:
            typer.echo(_silo_flags(directory, s))


@keys_app.command("add")
def keys_add(
    directory: Annotated[Path, typer.Argument(help="The directory `fedtrain keys init` made.")],
    silo: Annotated[str, typer.Option("--silo", help="The new silo's name (e.g. silo2).")],
    from_: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            help="Directory holding the silo's auth_key.pub and sign_key.pub (made on the silo "
            "with `fedtrain keys silo`); only these are copied. Default: make fresh keys here.",
        ),
    ] = None,
) -> None:
    """Add a silo to an existing keys directory (restart `fedtrain server` to register it)."""
    with user_errors(ValueError, OSError):
        from fedtrain.transport.keys import add_silo

        files = add_silo(directory, silo, from_)
        typer.echo(f"added silo {silo}: {', '.join(str(f) for f in files)}")
        if from_ is None:
            typer.echo(_silo_flags(directory, silo))
        else:
            typer.echo(
                f"  silo {silo} runs with its own keys: --tls-ca ca.crt (send it {directory}/"
                "ca.crt) --auth-key DIR/auth_key --signing-key DIR/sign_key"
            )
        typer.echo(
            "  the coordinator registers it when it starts (fedtrain server --tls-dir); "
            "the run's data.silos must include it"
        )


@keys_app.command("silo")
def keys_silo(
    silo: Annotated[str, typer.Option("--silo", help="This silo's name in the run.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write this silo's keys.")],
) -> None:
    """Make this silo's auth and signing keys here; only the .pub files go to the coordinator."""
    with user_errors(ValueError, OSError):
        from fedtrain.transport.keys import PUBLIC_FILES, make_silo_keys

        files = make_silo_keys(out, silo)
        typer.echo(f"wrote {len(files)} files to {out} (private keys stay on this machine)")
        typer.echo(f"  send to the coordinator: {' '.join(str(out / n) for n in PUBLIC_FILES)}")
        typer.echo(
            f"  they run: fedtrain keys add KEYS_DIR --silo {silo} --from <those files' dir>"
        )
        typer.echo(
            f"  then: fedtrain client --silo {silo} --tls-ca ca.crt --auth-key {out}/auth_key "
            f"--signing-key {out}/sign_key ..."
        )
