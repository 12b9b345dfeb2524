"""``fedtrain sweep``: simulate the cartesian product of config grids, one run directory each.

The points come from :func:`fedtrain.simulation.sweep_plan.plan_sweep` (grids parsed, every
config validated before the first run starts). Each run goes to ``OUT/<key=value,...>``; a
finished run (``summary.json`` present) is not run again but re-read, an interrupted one is
resumed, and a failed one becomes a CSV row with its error.
``OUT/sweep.csv`` is rewritten after every run, ``OUT/sweep.png`` compares the runs at the end.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtrain.config import ConfigError, config_sha256, load_config
from fedtrain.simulation.sweep_plan import SweepPoint, short_keys, show_value
from fedtrain.storage.rundir import atomic_write_bytes

__all__ = ["RESULT_COLUMNS", "plot_sweep", "run_sweep", "write_csv"]

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "final_eval_loss",
    "bytes_total",
    "bytes_up",
    "bytes_down",
    "sim_time_s",
    "compute_utilisation",
    "rounds",
    "rounds_failed",
    "wall_s",
    "run_dir",
    "error",
)
"""CSV columns after the grid keys (``error`` is empty for a run that finished)."""


def _check_finished(points: list[SweepPoint], out: Path) -> None:
    """Refuse up front when a finished run in ``out`` was made from a different config.

    The run's ``config.toml`` is read with today's schema, so keys added since (with their
    defaults) do not count as a difference.
    """
    for p in points:
        run_dir = out / p.name
        if _read_summary(run_dir) is None:
            continue
        try:
            same = config_sha256(load_config(run_dir / "config.toml")) == config_sha256(p.cfg)
        except ConfigError:
            same = False
        if not same:
            raise ConfigError(
                f"{run_dir} holds a finished run with a different config; "
                "choose another --out for this sweep"
            )


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return summary


def _result_row(point: SweepPoint, run_dir: Path, summary: dict[str, Any] | None) -> dict:
    row: dict[str, Any] = {k: show_value(v) for k, v in point.values.items()}
    for col in RESULT_COLUMNS:
        row[col] = (summary or {}).get(col)
    row["run_dir"] = str(run_dir)
    row["error"] = ""
    return row


def _fmt_result(row: dict[str, Any]) -> str:
    if row["error"]:
        return f"FAILED: {row['error']}"
    loss = row["final_eval_loss"]
    parts = [
        f"final eval loss {loss:.4f}" if loss is not None else "no eval",
        f"{(row['bytes_total'] or 0) / 1e6:.3g} MB",
        f"sim {row['sim_time_s'] or 0:.4g} s",
        f"wall {row['wall_s'] or 0:.1f} s",
    ]
    return ", ".join(parts)


def write_csv(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """Write the sweep table (grid keys, then :data:`RESULT_COLUMNS`) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*keys, *RESULT_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


SimulateFn = Callable[..., dict[str, Any]]


def run_sweep(
    points: list[SweepPoint],
    out: Path,
    *,
    echo: Callable[[str], None] = print,
    simulate: SimulateFn | None = None,
) -> list[dict[str, Any]]:
    """Run every point into ``out/<name>``, write ``sweep.csv`` and ``sweep.png``; return rows.

    ``simulate(cfg, run_dir, quiet=True, resume=...)`` defaults to the in-process runner.
    """
    if simulate is None:
        from fedtrain.simulation.runner import simulate as simulate_run

        simulate = simulate_run
    _check_finished(points, out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(points[0].values) if points else []
    rows: list[dict[str, Any]] = []
    n = len(points)
    for i, point in enumerate(points, 1):
        run_dir = out / point.name
        summary = _read_summary(run_dir)
        if summary is not None:
            row = _result_row(point, run_dir, summary)
            echo(f"[{i}/{n}] {point.label}: skipped (finished before); {_fmt_result(row)}")
        else:
            resume = (run_dir / "index.sqlite").exists()
            started = time.perf_counter()
            try:
                summary = simulate(point.cfg, run_dir, quiet=True, resume=resume)
                row = _result_row(point, run_dir, summary)
            except Exception as e:  # a failed run is a row, not the end of the sweep
                log.debug("run %s failed", run_dir, exc_info=True)
                row = _result_row(point, run_dir, None)
                row["wall_s"] = round(time.perf_counter() - started, 3)
                row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
                if resume:
                    row["error"] += f" (resuming failed; remove {run_dir} to start it over)"
            verb = "resumed; " if resume and not row["error"] else ""
            echo(f"[{i}/{n}] {point.label}: {verb}{_fmt_result(row)}")
        rows.append(row)
        write_csv(rows, keys, out / "sweep.csv")
    plot_sweep(rows, keys, out / "sweep.png")
    return rows


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], path: Path) -> Path:
    """Final eval loss vs total bytes and vs simulated time, one labelled marker per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    short = short_keys(keys)
    done = [r for r in rows if not r["error"] and r["final_eval_loss"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = "osD^v<>PXh*"
    for xkey, scale, xlabel, ax in (
        ("bytes_total", 1e-6, "total bytes (MB, up + down + join)", axes[0]),
        ("sim_time_s", 1.0, "simulated time (s)", axes[1]),
    ):
        xs = []
        for j, r in enumerate(done):
            x = (r[xkey] or 0) * scale
            xs.append(x)
            label = " ".join(f"{short[k]}={r[k]}" for k in keys)
            ax.scatter([x], [r["final_eval_loss"]], marker=markers[j % len(markers)], s=50)
            ax.annotate(
                label,
                (x, r["final_eval_loss"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
            )
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.3, y=0.15)  # room for the labels
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final eval loss (nats/token)")
    failed = len(rows) - len(done)
    fig.suptitle(
        f"sweep: {len(done)} runs" + (f" ({failed} failed or without eval)" if failed else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
