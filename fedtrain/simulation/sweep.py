"""``fedtrain sweep``: simulate the cartesian product of config grids, one run directory each.

A grid is ``section.key=V1,V2,...``; values are parsed like ``--set`` values (TOML, else a
string). Every point's config is built and validated before the first run starts. Each run
goes to ``OUT/<key=value,...>``; a finished run (``summary.json`` present) is not run again but
re-read, an interrupted one is resumed, and a failed one becomes a CSV row with its error.
``OUT/sweep.csv`` is rewritten after every run, ``OUT/sweep.png`` compares the runs at the end.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_sha256,
    load_config,
    packaged_example,
)
from fedtrain.storage.rundir import atomic_write_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "RESULT_COLUMNS",
    "Grid",
    "SweepPoint",
    "default_sweep_dir",
    "parse_grid",
    "plan_sweep",
    "plot_sweep",
    "run_sweep",
    "split_values",
    "write_csv",
]

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

_OPEN = {"[": "]", "{": "}"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True, slots=True)
class Grid:
    """One ``--grid``: a config key and the values it takes."""

    key: str
    """Dotted config key, e.g. ``train.inner_steps``."""
    values: tuple[Any, ...]
    """Parsed values, in the order given."""


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One run of the sweep: its grid values, run-directory name and validated config."""

    values: dict[str, Any]
    """Grid key -> value for this run."""
    name: str
    """Run directory name under the sweep directory (``key=value,...``)."""
    label: str
    """Human-readable point, e.g. ``inner_steps=25 codec=int4``."""
    cfg: Config
    """The validated config of the run."""


def show_value(value: Any) -> str:
    """A grid value as text: strings as they are, everything else as JSON (TOML-like)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def split_values(text: str) -> list[str]:
    """Split ``text`` on commas that are outside brackets, braces and quotes; strip each part."""
    parts: list[str] = []
    stack: list[str] = []
    quote = ""
    start = 0
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1  # skip the escaped character
            elif c == quote:
                quote = ""
        elif c in ("'", '"'):
            quote = c
        elif c in _OPEN:
            stack.append(_OPEN[c])
        elif c in ("]", "}"):
            if not stack or stack.pop() != c:
                raise ValueError(f"unbalanced {c!r} in {text!r}")
        elif c == "," and not stack:
            parts.append(text[start:i].strip())
            start = i + 1
        i += 1
    if quote or stack:
        raise ValueError(f"unclosed {quote or stack[-1]!r} in {text!r}")
    parts.append(text[start:].strip())
    return parts


def parse_grid(spec: str) -> Grid:
    """Parse ``section.key=V1,V2,...`` into a :class:`Grid` (values parsed as TOML)."""
    key, eq, raw = spec.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise ConfigError(
            f"--grid {spec!r}: expected section.key=V1,V2,..., e.g. train.inner_steps=25,50"
        )
    try:
        texts = split_values(raw)
    except ValueError as e:
        raise ConfigError(f"--grid {spec!r}: {e}") from None
    if any(t == "" for t in texts):
        raise ConfigError(f"--grid {spec!r}: empty value (values are separated by commas)")
    values = []
    for t in texts:
        node: Any = apply_overrides({}, [f"{key}={t}"])
        for p in parts:
            node = node[p]
        values.append(node)
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
        raise ConfigError(f"--grid {spec!r}: a value is listed twice")
    return Grid(key=key, values=tuple(values))


def _read_toml(config: Path | None) -> dict[str, Any]:
    p = config if config is not None else packaged_example()
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Last key component for the run names, unless two grids share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _run_names(keys: list[str], combos: list[tuple[Any, ...]]) -> list[str]:
    short = _short_keys(keys)
    names = []
    for combo in combos:
        shown = [_NAME_UNSAFE.sub("_", show_value(v)).strip("_") or "_" for v in combo]
        names.append(",".join(f"{short[k]}={s[:40]}" for k, s in zip(keys, shown, strict=True)))
    out = []
    for name, combo in zip(names, combos, strict=True):
        if names.count(name) > 1 or len(name) > 150:
            digest = hashlib.sha256(
                json.dumps(combo, sort_keys=True, default=str).encode()
            ).hexdigest()[:8]
            name = f"{name[:150]}-{digest}"
        out.append(name)
    return out


def plan_sweep(config: Path | None, grids: list[str], overrides: list[str]) -> list[SweepPoint]:
    """Every point of the grids' cartesian product, each with its config built and validated.

    Raises :class:`~fedtrain.config.ConfigError` naming the first bad grid, key or value.
    """
    if not grids:
        raise ConfigError("give at least one --grid section.key=V1,V2,...")
    parsed = [parse_grid(g) for g in grids]
    keys = [g.key for g in parsed]
    for k in keys:
        if keys.count(k) > 1:
            raise ConfigError(f"--grid {k}: given more than once")
    base = apply_overrides(_read_toml(config), list(overrides))
    set_keys = {o.partition("=")[0].strip() for o in overrides}
    for k in keys:
        if k in set_keys:
            raise ConfigError(f"{k} is both in --set and --grid; keep one")
    combos = list(itertools.product(*(g.values for g in parsed)))
    short = _short_keys(keys)
    points = []
    for combo, name in zip(combos, _run_names(keys, combos), strict=True):
        values = dict(zip(keys, combo, strict=True))
        data = copy.deepcopy(base)
        for k, v in values.items():
            *path, leaf = k.split(".")
            node = data
            for p in path:
                child = node.setdefault(p, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"--grid {k}: '{p}' is not a table")
                node = child
            node[leaf] = copy.deepcopy(v)
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            shown = " ".join(f"{k}={show_value(v)}" for k, v in values.items())
            raise ConfigError(f"grid point {shown}: {e}") from None
        label = " ".join(f"{short[k]}={show_value(v)}" for k, v in values.items())
        points.append(SweepPoint(values=values, name=name, label=label, cfg=cfg))
    return points


def default_sweep_dir(config: Path | None, grids: list[str], overrides: list[str]) -> Path:
    """``runs/sweep-<name>-<hash>``: the same command line maps to the same directory."""
    base = apply_overrides(_read_toml(config), list(overrides))
    blob = json.dumps({"config": base, "grids": grids}, sort_keys=True, default=str)
    run = base.get("run")
    name = _NAME_UNSAFE.sub("_", str(run.get("name", "fedtrain") if isinstance(run, dict) else ""))
    return Path("runs") / f"sweep-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


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

    short = _short_keys(keys)
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
