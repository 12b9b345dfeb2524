"""``fedtrain report``: one HTML or Markdown page comparing runs (or the runs of a sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["report"]


def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories, or sweep directories (standing for their runs)."),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="FILE.html (one self-contained file) or FILE.md (images in FILE_files/). "
            "Default: DIR/report.html for one directory, else ./report.html.",
        ),
    ] = None,
) -> None:
    """Summary table, config differences, comparison plots and each run's plots."""
    with user_errors(ValueError, OSError):
        from fedtrain.storage.report import write_report

        target = out or (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
        typer.echo(str(write_report(run_dirs, target)))
