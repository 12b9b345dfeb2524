"""Reading run directories for reports: which paths are runs (a sweep directory stands for the
runs under it, in ``sweep.csv`` order) and what a report needs from each run (:class:`RunRecord`).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ReportError", "RunRecord", "expand_run_dirs", "is_run_dir", "load_run"]


class ReportError(ValueError):
    """A path given to the report is not a run (or sweep) directory, or a run file is broken."""


@dataclass(slots=True)
class RunRecord:
    """What a report needs from one run directory."""

    path: Path
    """The run directory."""
    label: str
    """Short unique name of the run in the report."""
    summary: dict[str, Any]
    """``summary.json`` (empty while the run has not finished)."""
    metrics: list[dict[str, Any]]
    """``metrics.jsonl`` rows, one per committed round."""
    config: dict[str, Any]
    """Flattened ``config.toml``: ``section.key`` -> value."""
    plots: list[Path]
    """The run's own PNG plots."""


def is_run_dir(path: Path) -> bool:
    """A run directory has its config and a summary or metrics stream."""
    return (path / "config.toml").is_file() and (
        (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()
    )


def _sweep_runs(path: Path) -> list[Path]:
    """Run directories directly under ``path``, in ``sweep.csv`` order when there is one."""
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
    order: list[str] = []
    csv_path = path / "sweep.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            order = [Path(r.get("run_dir") or "").name for r in csv.DictReader(f)]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(runs, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories named by ``paths``; a sweep directory stands for the runs under it."""
    if not paths:
        raise ReportError("give at least one run or sweep directory")
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory (expected a run or sweep directory)")
        runs = [p] if is_run_dir(p) else _sweep_runs(p)
        if not runs:
            raise ReportError(
                f"{p} is not a run directory (needs config.toml and summary.json or "
                "metrics.jsonl) and holds no runs"
            )
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key))
        else:
            flat[key] = v
    return flat


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: invalid JSON ({e})") from None


def load_run(path: Path, label: str | None = None) -> RunRecord:
    """Read one run directory; broken files raise :class:`ReportError` naming them."""
    if not is_run_dir(path):
        raise ReportError(f"{path} is not a run directory")
    try:
        config = tomllib.loads((path / "config.toml").read_text())
    except tomllib.TOMLDecodeError as e:
        raise ReportError(f"{path / 'config.toml'}: invalid TOML ({e})") from None
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        summary = _read_json(path / "summary.json")
        if not isinstance(summary, dict):
            raise ReportError(f"{path / 'summary.json'}: expected a JSON object")
    metrics = []
    mpath = path / "metrics.jsonl"
    if mpath.is_file():
        for n, line in enumerate(mpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                raise ReportError(f"{mpath}: line {n} is not valid JSON") from None
    plots = sorted((path / "plots").glob("*.png")) if (path / "plots").is_dir() else []
    return RunRecord(
        path=path,
        label=label or path.name,
        summary=summary,
        metrics=metrics,
        config=_flatten(config),
        plots=plots,
    )
