"""The ``fedtrain`` command. Importing this module must not import torch or flwr."""

from __future__ import annotations

from typing import Annotated

import typer

from fedtrain.cli import data as data_cmd
from fedtrain.cli import deploy as deploy_cmd
from fedtrain.cli import flwr as flwr_cmd
from fedtrain.cli import keys as keys_cmd
from fedtrain.cli import model as model_cmd
from fedtrain.cli import report as report_cmd
from fedtrain.cli import simulate as simulate_cmd
from fedtrain.cli import status as status_cmd
from fedtrain.cli import store as store_cmd
from fedtrain.cli import sweep as sweep_cmd

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedtrain",
    help="Federated, low-bandwidth LLM training across silos (DiLoCo on Flower).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate")(simulate_cmd.simulate)
app.command("sweep")(sweep_cmd.sweep)
app.command("report")(report_cmd.report)
app.command("server")(deploy_cmd.server)
app.command("client")(deploy_cmd.client)
app.command("export")(model_cmd.export)
app.command("eval")(model_cmd.eval_run)
app.command("generate")(model_cmd.generate)
app.command("status")(status_cmd.status)
app.command(
    "flwr",
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)(flwr_cmd.flwr)
app.add_typer(keys_cmd.keys_app, name="keys")
app.add_typer(data_cmd.data_app, name="data")
app.add_typer(store_cmd.app, name="store")


def _version(value: bool) -> None:
    if value:
        from fedtrain import __version__

        typer.echo(f"fedtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and exit.",
            callback=_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Federated, low-bandwidth LLM training across silos."""


def main() -> None:
    """Console entry point."""
    app(prog_name="fedtrain")


if __name__ == "__main__":  # pragma: no cover
    main()
