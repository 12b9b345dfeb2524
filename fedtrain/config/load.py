"""Loading: TOML files and nested dicts into a validated :class:`Config`, ``--set`` overrides,
the packaged examples and the config hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from fedtrain.config.errors import ConfigError
from fedtrain.config.root import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_sha256",
    "config_to_dict",
    "load_config",
    "packaged_example",
]


_SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a TOML table, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        full = f"{prefix}.{key}" if prefix else key
        if name not in fields:
            raise ConfigError(f"unknown key '{full}' (allowed: {', '.join(sorted(fields))})")
        kwargs[name] = _coerce(hints[name], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return value  # checked by the section's __post_init__
    if origin is types.UnionType:
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        names = [
            words.get(o, "a list" if typing.get_origin(o) is list else str(o))
            for o in typing.get_args(tp)
        ]
        raise ConfigError(f"{key}: expected {' or '.join(names)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts (as parsed from TOML)."""
    for key in data:
        if key.replace("-", "_") not in _SECTIONS:
            raise ConfigError(f"unknown section '{key}' (allowed: {', '.join(sorted(_SECTIONS))})")
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (TOML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def config_sha256(cfg: Config) -> str:
    """Stable hash of the resolved config (canonical JSON)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings); else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a parsed TOML dict (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.inner_steps=20")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: KEY must be section.key, e.g. run.rounds")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a table")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def packaged_example(name: str = "quickstart") -> Path:
    """Path of a config shipped inside the package (``fedtrain/examples/NAME.toml``)."""
    path = Path(__file__).parent.parent / "examples" / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"no packaged example config named {name!r}")
    return path


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    purpose: Literal["run", "deploy"] = "run",
) -> Config:
    """Load a TOML run config (default: the packaged quickstart) and apply overrides.

    With ``purpose="deploy"`` (``fedtrain server``) the simulated silos' hardware profiles
    (``simulation.profiles``) are dropped before validation: they describe virtual silos, so
    a deployment neither checks them against ``data.silos`` nor writes them into its run.
    """
    p = Path(path) if path is not None else packaged_example()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    data = apply_overrides(data, overrides or [])
    if purpose == "deploy" and isinstance(data.get("simulation"), dict):
        data["simulation"].pop("profiles", None)
    return config_from_dict(data)
