"""``fedtrain simulate``: train across virtual silos in one process."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from fedtrain.cli.errors import user_errors

if TYPE_CHECKING:
    from fedtrain.config import Config

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
        from fedtrain.simulation.runner import simulate as run_simulation

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        cfg = _load(config, run_dir, set_, engine, resume)
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


def _load(
    config: Path | None,
    run_dir: Path | None,
    set_: list[str] | None,
    engine: str | None,
    resume: bool,
) -> Config:
    """The run's config: with ``resume`` the one saved in ``run_dir`` (refusing another
    --engine, and --config/--set unless they resolve to that same config), else ``config``
    with the --set overrides and --engine applied."""
    from fedtrain.config import load_config
    from fedtrain.run import load_run_config

    chosen = [f"simulation.engine={json.dumps(engine)}"] if engine is not None else []
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --run-dir DIR (the run to continue)")
        cfg = load_run_config(run_dir)
        if engine is not None and engine != cfg.simulation.engine:
            raise ValueError(
                f"--engine {engine}: the run in {run_dir} was started with "
                f"simulation.engine = {cfg.simulation.engine!r}; drop --engine"
            )
        if config is not None or set_:
            # The same command repeated is fine; anything else would silently change the run.
            differ = config_differences(load_config(config, [*(set_ or []), *chosen]), cfg)
            if differ:
                raise ValueError(
                    f"--resume: the given config differs from the run's in {differ} "
                    "(drop --config/--set to continue with the run's own)"
                )
        return cfg
    return load_config(config, [*(set_ or []), *chosen])


def config_differences(given: Config, stored: Config, limit: int = 6) -> str:
    """``key (given vs stored), ...`` for each differing config key (at most ``limit``
    named); empty when the two resolve to the same config."""
    from fedtrain.config import config_to_dict

    a, b = _flat(config_to_dict(given)), _flat(config_to_dict(stored))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    named = [f"{k} ({_show(a.get(k))} vs {_show(b.get(k))})" for k in keys[:limit]]
    if len(keys) > limit:
        named.append(f"and {len(keys) - limit} more")
    return ", ".join(named)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, default=str)


def _analytic_line(summary: dict[str, object], out: Path) -> str:
    util = summary["compute_utilisation"]
    secs = float(summary["sim_time_s"])  # type: ignore[arg-type]
    took = f"{secs / 3600:.2f} simulated hours" if secs >= 3600 else f"{secs:.1f} simulated s"
    return (
        f"{summary['strategy']}: {summary['rounds']} rounds, {took}, "
        f"utilisation {100 * float(util):.1f}%, "  # type: ignore[arg-type]
        f"{int(summary['bytes_total']) / 1e9:.2f} GB exchanged -> {out}"  # type: ignore[call-overload]
    )
