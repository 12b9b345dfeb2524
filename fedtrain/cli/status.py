"""``fedtrain status``: where a run stands (current round, silos, bytes, loss, ETA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["format_status", "status"]


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def format_status(st: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """A one-paragraph summary and the silo table (columns, rows) of :func:`run_status`."""
    rnd = f"round {st['round']}/{st['expected_rounds']}"
    if st["in_progress"]:
        rnd += f" (round {st['in_progress']} in progress)"
    budget = f" of {st['token_budget']:,}" if st["token_budget"] else ""
    lines = [
        f"{st['name']}: {st['strategy']}, {st['codec']} — {st['state']}, {rnd}",
        f"tokens {st['tokens']:,}{budget}; train loss {_num(st['train_loss'])}, "
        f"eval loss {_num(st['eval_loss'])}",
        f"bytes up {_bytes(st['bytes_up'])}, down {_bytes(st['bytes_down'])}; stragglers "
        f"{st['stragglers']}, rejected {st['rejected']}; elapsed {_secs(st['elapsed_s'])}, "
        f"ETA {_secs(st['eta_s'])}",
    ]
    if st["failure"]:
        lines.append(f"failure: {st['failure']}")
    columns = ["silo", "last round", "bytes up", "train loss", "strikes", "stragglers", "cosine"]
    rows = []
    for s in st["silos"]:
        name = s["silo"] + (" (quarantined)" if s["quarantined"] else "")
        rows.append(
            [
                name,
                _num(s["last_round"]),
                _bytes(s["bytes_up"]),
                _num(s["train_loss"]),
                str(s["strikes"]),
                str(s["stragglers"]),
                _num(s["cosine_to_aggregate"]),
            ]
        )
    return "\n".join(lines), columns, rows


def status(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (running or finished).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Current round, each silo's last reply, bytes, loss, strikes, stragglers and ETA."""
    with user_errors(ValueError, OSError):
        from fedtrain.storage.status import run_status

        st = run_status(run_dir)
        if as_json:
            typer.echo(json.dumps(st))
            return
        from rich.console import Console
        from rich.table import Table

        summary, columns, rows = format_status(st)
        console = Console()
        console.print(summary, highlight=False)
        table = Table()
        for c in columns:
            table.add_column(c)
        for row in rows:
            table.add_row(*row)
        console.print(table)
