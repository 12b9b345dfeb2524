"""TensorBoard event files of a run's metrics: every numeric ``metrics.jsonl`` field, per round.

Written with the ``tensorboard`` package's event writer (via ``torch.utils.tensorboard``), one
scalar per field at step = the round, plus the same scalars against tokens under ``by_tokens/``
(``eval_loss`` vs tokens is how runs of different round sizes compare). A resumed run opens a
new event file and discards, as TensorBoard does with ``purge_step``, the rounds it replays.
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
        self._writer: Any = None

    def write(self, row: dict[str, Any]) -> None:
        step = int(row.get("round", 0))
        if self._writer is None:  # the first row seen: a resumed run purges what it replays
            self._writer = self._writer_class(
                log_dir=str(self.directory), purge_step=step, flush_secs=30
            )
        tokens = row.get("tokens")
        for key, value in scalars_of(row).items():
            self._writer.add_scalar(key, value, global_step=step)
            if isinstance(tokens, int) and key != "tokens":
                self._writer.add_scalar(f"by_tokens/{key}", value, global_step=tokens)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
