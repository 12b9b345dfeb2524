"""Turn errors a user can cause into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

__all__ = ["user_errors"]


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Print ``error: <message>`` for ``kinds`` (and Ctrl-C) and exit 2 instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except kinds as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
