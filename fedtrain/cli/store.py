"""``fedtrain store``: look into a run's store — rounds, silo updates, workloads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["app"]

app = typer.Typer(help="Inspect and query a run's store (index + blobs).", no_args_is_help=True)

_ROUND_METRICS = (
    "tokens",
    "train_loss",
    "eval_loss",
    "bytes_up",
    "bytes_down",
    "silos",
    "stragglers",
    "rejected",
    "quarantined",
)

RunDirArg = Annotated[Path, typer.Argument(help="The run directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _open(run_dir: Path) -> Any:
    from fedtrain.storage.runstore import RunStore

    if not (run_dir / "index.sqlite").exists():
        raise ValueError(f"{run_dir} is not a run directory (index.sqlite missing)")
    return RunStore(run_dir)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("silo", "reason", "status") else "left")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    # In a terminal, fit it; into a pipe or file, never truncate.
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 240
    Console(width=width).print(t)


def _emit(data: Any, as_json: bool, render: Any) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        render()


@app.command("ls")
def ls(run_dir: RunDirArg, json_out: JsonOpt = False) -> None:
    """Rounds: status, tokens, losses, bytes, silos."""
    with user_errors(ValueError, RuntimeError, OSError):
        store = _open(run_dir)
        metrics = {m["round"]: m for m in store.index.metrics()}
        rows = [
            {**r, **{k: metrics.get(r["round"], {}).get(k) for k in _ROUND_METRICS}}
            for r in store.index.rounds()
        ]
        cols = ["round", "status", *_ROUND_METRICS]
        _emit(
            rows, json_out, lambda: _table(f"{run_dir}", cols, [[r[c] for c in cols] for r in rows])
        )


@app.command("show")
def show(
    run_dir: RunDirArg,
    round: Annotated[int, typer.Option("--round", "-r", help="Round to show.")],
    json_out: JsonOpt = False,
) -> None:
    """One round's silo updates (valid or rejected, why, bytes, codec, weight) and events."""
    with user_errors(ValueError, RuntimeError, OSError):
        store = _open(run_dir)
        updates = store.index.updates(round)
        if not updates:
            raise ValueError(f"round {round} has no stored updates")
        events = [e for e in store.index.events() if e.get("round") == round]
        cols = ["silo", "valid", "reason", "bytes", "codec", "weight"]
        _emit(
            {"updates": updates, "events": events},
            json_out,
            lambda: _table(f"round {round}", cols, [[u[c] for c in cols] for u in updates]),
        )


@app.command("query")
def query(
    run_dir: RunDirArg,
    workload: Annotated[
        str,
        typer.Argument(help="similarity | anomalies | contribution | debug_round | latest_model"),
    ],
    round: Annotated[
        Optional[int], typer.Option("--round", "-r", help="Round (default: the newest committed).")
    ] = None,
    method: Annotated[str, typer.Option(help="contribution: loo | shapley | mc-shapley")] = "loo",
    out: Annotated[
        Optional[Path],
        typer.Option(help="latest_model: write the weights to this safetensors file."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a registered workload next to the cache."""
    with user_errors(ValueError, RuntimeError, OSError, KeyError):
        from fedtrain.storage.cache import MetadataCache
        from fedtrain.storage.functions import FUNCTIONS, FunctionContext, make_evaluator

        store = _open(run_dir)
        if workload not in FUNCTIONS:
            raise ValueError(f"unknown workload {workload!r}; available: {sorted(FUNCTIONS)}")
        committed = store.index.committed_rounds()
        if not committed:
            raise ValueError(f"{run_dir} has no committed round")
        rnd = round if round is not None else committed[-1]
        if rnd not in committed:
            raise ValueError(f"round {rnd} is not committed (committed: {committed})")
        needs_eval = workload in ("contribution", "debug_round")
        ctx = FunctionContext(
            cache=MetadataCache(store, 1 << 30),
            evaluate=make_evaluator(run_dir) if needs_eval else None,
        )
        fn = FUNCTIONS[workload]
        if workload == "latest_model":
            from safetensors.torch import save_file

            if out is None:
                raise ValueError("latest_model needs --out FILE.safetensors")
            weights = fn(ctx)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
            typer.echo(f"wrote round {committed[-1]} weights to {out}")
            return
        kwargs: dict[str, Any] = {"round": rnd}
        if workload == "contribution":
            kwargs["method"] = method
        result = fn(ctx, **kwargs)

        def render() -> None:
            if workload in ("similarity", "contribution"):
                _table(
                    f"{workload} round {rnd}",
                    ["silo", "score"],
                    [[s, v] for s, v in sorted(result.items())],
                )
            elif workload == "anomalies":
                cols = ["cosine_to_aggregate", "log_norm", "z_cosine", "z_norm", "cluster"]
                _table(
                    f"anomalies round {rnd} (flagged: {', '.join(result['flagged']) or '-'})",
                    ["silo", *cols],
                    [[s, *[v[c] for c in cols]] for s, v in sorted(result["silos"].items())],
                )
            else:
                cols = ["valid", "reason", "bytes", "norm", "cosine_to_aggregate"]
                rows = [
                    [s, *[v.get(c) for c in cols], result.get("loss_moved_by", {}).get(s)]
                    for s, v in sorted(result["silos"].items())
                ]
                _table(f"round {rnd}", ["silo", *cols, "loo"], rows)

        _emit(result, json_out, render)
