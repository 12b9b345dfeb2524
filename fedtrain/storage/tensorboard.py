"""TensorBoard event files of a run's metrics: every numeric ``metrics.jsonl`` field, per round.

Written with the ``tensorboard`` package's event writer (via ``torch.utils.tensorboard``), one
scalar per field at step = the round, plus the same scalars against tokens in the
``by_tokens/`` subdirectory (``eval_loss`` vs tokens is how runs of different round sizes
compare; its own writer, since TensorBoard's purge on resume goes by step across a writer's
tags). A resumed run opens new event files that purge, from its first round (and token count)
on, what an earlier process wrote.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardLog", "scalars_of"]


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a metrics row (booleans, text and lists left out)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key == "round" or not math.isfinite(value):
            continue
        out[key] = float(value)
    return out


class TensorBoardLog:
    """Scalars of each committed round, appended to event files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "run.tensorboard = true needs the tensorboard package "
                "(pip install 'fedtrain[tensorboard]' or pip install tensorboard)"
            ) from None
        self.directory = directory
        self._writer_class = SummaryWriter
        self._writers: tuple[Any, Any] | None = None

    def write(self, row: dict[str, Any]) -> None:
        step = int(row.get("round", 0))
        tokens = row.get("tokens")
        if self._writers is None:  # the first row seen: a resumed run purges what it replays
            first_tokens = tokens if isinstance(tokens, int) else 0
            self._writers = (
                self._writer_class(log_dir=str(self.directory), purge_step=step, flush_secs=30),
                self._writer_class(
                    log_dir=str(self.directory / "by_tokens"),
                    purge_step=first_tokens,
                    flush_secs=30,
                ),
            )
        by_round, by_tokens = self._writers
        for key, value in scalars_of(row).items():
            by_round.add_scalar(key, value, global_step=step)
            if isinstance(tokens, int) and key != "tokens":
                by_tokens.add_scalar(f"by_tokens/{key}", value, global_step=tokens)
        by_round.flush()
        by_tokens.flush()

    def close(self) -> None:
        if self._writers is not None:
            for writer in self._writers:
                writer.close()
            self._writers = None
