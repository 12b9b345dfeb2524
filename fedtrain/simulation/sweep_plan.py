"""Planning a sweep: ``--grid section.key=V1,V2,...`` parsed, the cartesian product of the grids
built into validated configs, one named point (and run directory) each.

A grid's values are parsed like ``--set`` values (TOML, else a string); every point's config is
built and validated before the first run starts.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.config import Config, ConfigError, apply_overrides, config_from_dict, packaged_example

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Grid",
    "SweepPoint",
    "default_sweep_dir",
    "parse_grid",
    "plan_sweep",
    "short_keys",
    "show_value",
    "split_values",
]

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


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last key component of each grid key for run names and labels, unless two grids share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _run_names(keys: list[str], combos: list[tuple[Any, ...]]) -> list[str]:
    short = short_keys(keys)
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
    short = short_keys(keys)
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
