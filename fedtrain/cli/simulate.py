"""``fedtrain simulate``: train across virtual silos in one process."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["simulate"]


def simulate(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Run config (TOML). Default: the packaged quickstart."),
    ] = None,
    run_dir: Annotated[
        Optional[Path],
        typer.Option("--run-dir", help="Where outputs go. Default: runs/<name>-<timestamp>."),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="Override a config key, e.g. --set train.inner_steps=20 (repeatable)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --run-dir from its last committed round."
        ),
    ] = False,
) -> None:
    """Run the coordinator and N virtual silos in this process on a virtual clock."""
    with user_errors(ValueError, RuntimeError, OSError):
        from fedtrain.config import load_config
        from fedtrain.simulation.runner import load_run_config
        from fedtrain.simulation.runner import simulate as run_simulation

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if resume:
            if run_dir is None:
                raise ValueError("--resume needs --run-dir DIR (the run to continue)")
            if config is not None or set_:
                raise ValueError(
                    "--resume continues with the run's own config; drop --config/--set"
                )
            cfg = load_run_config(run_dir)
        else:
            cfg = load_config(config, set_ or [])
        out = run_dir or Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = run_simulation(cfg, out, quiet=quiet or json_out, resume=resume)
        if json_out:
            typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        elif quiet:
            typer.echo(str(out))
