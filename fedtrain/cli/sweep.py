"""``fedtrain sweep``: simulate every combination of a few config values and compare them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["sweep"]


def sweep(
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            "-g",
            help="A key and its values, e.g. --grid train.inner_steps=25,50,100 (repeatable; "
            "the sweep runs the cartesian product).",
        ),
    ],
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Run config (TOML). Default: the packaged quickstart."),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a config key in every run (repeatable)."),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="Sweep directory (one run directory per point, sweep.csv, sweep.png). "
            "Default: runs/sweep-<name>-<hash of config and grids>.",
        ),
    ] = None,
) -> None:
    """Run the cartesian product of the grids; finished runs in --out are re-read, not re-run.

    Exits 1 when a run failed (its sweep.csv row has the error), 2 on bad input.
    """
    with user_errors(ValueError, RuntimeError, OSError):
        from fedtrain.simulation.sweep import run_sweep
        from fedtrain.simulation.sweep_plan import default_sweep_dir, plan_sweep

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        overrides = set_ or []
        points = plan_sweep(config, grid, overrides)
        out_dir = out or default_sweep_dir(config, grid, overrides)
        typer.echo(f"sweep: {len(points)} run{'s' if len(points) != 1 else ''} -> {out_dir}")
        rows = run_sweep(points, out_dir, echo=typer.echo)
        failed = sum(1 for r in rows if r["error"])
        typer.echo(
            f"wrote {out_dir / 'sweep.csv'} and {out_dir / 'sweep.png'}"
            + (f" ({failed} of {len(rows)} runs failed; see the error column)" if failed else "")
        )
    if failed:
        raise typer.Exit(1)
