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
    engine: Annotated[
        Optional[str],
        typer.Option(
            "--engine",
            help="'inprocess' (default: virtual clock) or 'flower' (Flower's ServerApp and "
            "ClientApp under its Ray simulation runtime). Overrides simulation.engine.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --run-dir from its last committed round."
        ),
    ] = False,
    analytic: Annotated[
        bool,
        typer.Option(
            "--analytic",
            help="Time the run on the virtual clock without training (model size, token "
            "budget and hardware profiles only): time, utilisation and bytes, no losses.",
        ),
    ] = False,
) -> None:
    """Run the coordinator and N virtual silos in this process on a virtual clock (or, with
    --engine flower, under Flower's simulation runtime)."""
    with user_errors(ValueError, RuntimeError, OSError):
        from fedtrain.config import load_config
        from fedtrain.run import load_run_config
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
            if engine is not None and engine != cfg.simulation.engine:
                raise ValueError(
                    f"--engine {engine}: the run in {run_dir} was started with "
                    f"simulation.engine = {cfg.simulation.engine!r}; drop --engine"
                )
        else:
            chosen = [f"simulation.engine={json.dumps(engine)}"] if engine is not None else []
            cfg = load_config(config, [*(set_ or []), *chosen])
        if analytic and cfg.simulation.engine != "inprocess":
            raise ValueError(
                "--analytic times the run on the in-process engine's virtual clock; "
                "drop --engine flower"
            )
        out = run_dir or Path("runs") / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if analytic:
            from fedtrain.simulation.analytic import analytic_run

            if resume:
                raise ValueError("--analytic runs take seconds; they cannot be resumed")
            summary = analytic_run(cfg, out)
            if json_out:
                typer.echo(json.dumps(summary, indent=2, sort_keys=True))
            else:
                typer.echo(_analytic_line(summary, out))
            return
        summary = run_simulation(cfg, out, quiet=quiet or json_out, resume=resume)
        if json_out:
            typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        elif quiet:
            typer.echo(str(out))


def _analytic_line(summary: dict[str, object], out: Path) -> str:
    util = summary["compute_utilisation"]
    secs = float(summary["sim_time_s"])  # type: ignore[arg-type]
    took = f"{secs / 3600:.2f} simulated hours" if secs >= 3600 else f"{secs:.1f} simulated s"
    return (
        f"{summary['strategy']}: {summary['rounds']} rounds, {took}, "
        f"utilisation {100 * float(util):.1f}%, "  # type: ignore[arg-type]
        f"{int(summary['bytes_total']) / 1e9:.2f} GB exchanged -> {out}"  # type: ignore[call-overload]
    )
