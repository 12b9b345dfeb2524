"""Lazy package exports: ``__getattr__ = lazy(__name__, {"Name": "module.path"})``.

Used by packages whose light parts (the mailbox ClientApp, record conversion, process helpers)
must import without torch."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

__all__ = ["lazy"]


def lazy(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
