"""The run directory: config, metrics/events streams and summary (human-readable files).

Every file that replaces an older version is written to a temporary name, fsynced and renamed,
so a crash leaves either the old or the new file, never half of one. JSON-lines streams are
appended a line at a time and flushed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtrain.storage.tensorboard import TensorBoardLog

__all__ = ["RunDir", "atomic_write_bytes"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Files of one run under ``root`` (layout in ARCHITECTURE.md, "The run directory")."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plots = root / "plots"
        for d in (root, self.plots):
            d.mkdir(parents=True, exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"
        self.events_path = root / "events.jsonl"
        self.summary_path = root / "summary.json"
        self.tensorboard: TensorBoardLog | None = None

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.root / name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def _append(self, path: Path, obj: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")
            f.flush()

    def metric(self, row: dict[str, Any]) -> None:
        """Append one commit's metrics row (and its scalars to TensorBoard when enabled)."""
        self._append(self.metrics_path, row)
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def enable_tensorboard(self) -> None:
        """Also write every metrics row to TensorBoard event files under ``tensorboard/``."""
        from fedtrain.storage.tensorboard import TensorBoardLog

        if self.tensorboard is None:
            self.tensorboard = TensorBoardLog(self.root / "tensorboard")

    def event(self, kind: str, **fields: Any) -> None:
        """Append a structured event."""
        self._append(self.events_path, {"event": kind, "time": time.time(), **fields})

    def read_jsonl(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
