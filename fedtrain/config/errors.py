"""The config error and the one-line check every section uses."""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "check"]


class ConfigError(ValueError):
    """A config value or key a user wrote is not allowed; the message names it."""


def check(ok: bool, key: str, allowed: str, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and what is allowed unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")
