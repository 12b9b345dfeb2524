"""``fedtrain flwr ARGS...``: the Flower CLI (``flwr``) pointed at a run's own SuperLink.

``fedtrain server`` keeps Flower's settings in ``<run dir>/flwr`` (``FLWR_HOME``); the Flower
CLI run without it does not find the run's SuperLink (and ``flwr ls`` starts a stray local
one). This wrapper sets ``FLWR_HOME`` and, where ``flwr ls`` / ``flwr supernode ls`` /
``flwr log`` print node ids, appends the silo name recorded for that node in the run's
``events.jsonl`` (``silo_joined`` events): ``1234… (silo0)``; with ``--format json`` each
object with a ``node-id`` gains a ``silo`` field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedtrain.cli.errors import user_errors

__all__ = ["annotate_json", "annotate_line", "flwr", "flwr_home", "node_silos"]

_SHOWS_NODES = (("ls",), ("list",), ("log",), ("supernode", "ls"), ("supernode", "list"))
"""Subcommands whose output can hold node ids (the others keep the terminal as it is)."""
_NUMBER = re.compile(r"(?<![\w.])(\d+)( *)")


def flwr(
    args: Annotated[
        Optional[list[str]],
        typer.Argument(help="Arguments for the Flower CLI, e.g. ls, or log RUN_ID --stream."),
    ] = None,
    run_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--run-dir", help="The run's directory (default runs/<name>, as `fedtrain server`)."
        ),
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config", "-c", help="The run's config; names the default --run-dir as for server."
        ),
    ] = None,
) -> None:
    """Run the Flower CLI (flwr) against the run's SuperLink, silo names beside node ids.

    E.g. `fedtrain flwr ls`, `fedtrain flwr supernode ls`, `fedtrain flwr log RUN_ID`.
    Options for fedtrain go before the Flower arguments.
    """
    with user_errors(ValueError, OSError):
        rc = run_flwr(list(args or []), _default_run_dir(config) if run_dir is None else run_dir)
    if rc:
        raise typer.Exit(rc)


def _default_run_dir(config: Path | None) -> Path:
    """``runs/<run.name>`` of ``config`` (default: the packaged deploy example), as the server."""
    from fedtrain.config import load_config, packaged_example

    return Path("runs") / load_config(config or packaged_example("deploy")).run.name


def flwr_home(run_dir: Path) -> Path:
    """The run's ``FLWR_HOME``; ValueError when ``run_dir`` holds no run started by the server."""
    if not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir}: no such run directory (`fedtrain server` makes it)")
    home = run_dir.resolve() / "flwr"
    if not (home / "config.toml").is_file():
        raise ValueError(
            f"{run_dir} has no Flower settings (flwr/config.toml); start the run with "
            "`fedtrain server` first"
        )
    return home


def node_silos(run_dir: Path) -> dict[int, str]:
    """Node id -> silo name from the run's ``silo_joined`` events (every node a silo used)."""
    path = run_dir / "events.jsonl"
    names: dict[int, str] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return names
    for line in lines:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. the last line, still being written
        if isinstance(ev, dict) and ev.get("event") == "silo_joined":
            node, silo = ev.get("node"), ev.get("silo")
            if isinstance(node, int) and isinstance(silo, str):
                names[node] = silo
    return names


def annotate_line(line: str, names: dict[int, str]) -> str:
    """``line`` with `` (silo)`` after each known node id; in a table the tag takes the padding
    after the id where there is room, so columns stay aligned."""

    def tag(m: re.Match[str]) -> str:
        silo = names.get(int(m.group(1)))
        if silo is None:
            return m.group(0)
        label, pad = f" ({silo})", m.group(2)
        return m.group(1) + label + (pad[len(label) :] if len(pad) > len(label) else pad)

    return _NUMBER.sub(tag, line)


def annotate_json(value: Any, names: dict[int, str]) -> Any:
    """``value`` (parsed JSON) with a ``silo`` field beside each known ``node-id``."""
    if isinstance(value, list):
        return [annotate_json(v, names) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: annotate_json(v, names) for k, v in value.items()}
    node = str(value.get("node-id", value.get("node_id", "")))
    if node.isdigit() and int(node) in names:
        out["silo"] = names[int(node)]
    return out


def run_flwr(args: list[str], run_dir: Path) -> int:
    """Run ``flwr ARGS`` with the run's ``FLWR_HOME``; return its exit code."""
    home = flwr_home(run_dir)
    exe = shutil.which("flwr")
    if exe is None:
        raise ValueError("the Flower CLI (flwr) is not on PATH; install flwr")
    env = {**os.environ, "FLWR_HOME": str(home)}
    names = node_silos(run_dir)
    words = [a for a in args if not a.startswith("-")]
    if not names or not any(tuple(words[: len(c)]) == c for c in _SHOWS_NODES):
        return subprocess.run([exe, *args], env=env, check=False).returncode
    # Wide enough that Flower's tables do not fold a 20-digit node id over two lines.
    env.setdefault("COLUMNS", str(max(shutil.get_terminal_size((160, 24)).columns, 160)))
    env["PYTHONUNBUFFERED"] = "1"  # flwr writes to a pipe now: keep `log --stream` live
    if "json" in args and "--format" in args:
        r = subprocess.run([exe, *args], env=env, stdout=subprocess.PIPE, text=True, check=False)
        try:
            sys.stdout.write(json.dumps(annotate_json(json.loads(r.stdout), names), indent=2))
            sys.stdout.write("\n")
        except json.JSONDecodeError:
            sys.stdout.write(r.stdout)
        return r.returncode
    with subprocess.Popen([exe, *args], env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # line by line: `flwr log --stream` follows a live run
            sys.stdout.write(annotate_line(line, names))
            sys.stdout.flush()
    return proc.returncode
