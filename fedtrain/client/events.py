"""What a silo operator sees: the daemon's event log and the launcher's one line per event.

The trainer daemon (rank 0, the one process that serves requests) appends one JSON object per
event to ``<work dir>/events.jsonl``, flushed per line; ``fedtrain client`` tails the file and
prints each event as one line (:func:`describe`). Kinds:

- ``joined``: a run opened from its manifest (``run_id``, ``preset``, ``params``, ``codec``);
  ``resumed_round`` set when the silo's own snapshot was restored (a restarted silo).
- ``round``: one round's work (``round``, ``steps``, ``loss``, ``bytes_up``, ``bytes_down``,
  ``seconds``); ``missed`` lists the rounds since the last one that went on without it.
- ``round_failed``: a round the daemon refused (``round``, ``reason``).
- ``refused``: this silo is not part of the run (``reason``): it refused the manifest, or the
  coordinator said so (``leave``). The launcher exits 3.
- ``finished``: the run ended (``run_id``, ``version``). The launcher exits 0.

Torch-free: the launcher imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ERROR_FILE",
    "EVENTS_FILE",
    "EventLog",
    "EventTail",
    "describe",
    "failure_reason",
    "human_bytes",
]

EVENTS_FILE = "events.jsonl"
"""The event log's name in the silo's work dir."""
ERROR_FILE = "daemon.error"
"""Where a daemon process that fails writes its one-line reason (the first failure wins)."""


class EventLog:
    """Appends events to one JSON-lines file (one writer: the daemon's rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, event: str, **fields: Any) -> None:
        """Append ``{"t": unix time, "event": event, **fields}`` as one flushed line."""
        line = json.dumps({"t": round(time.time(), 3), "event": event, **fields})
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
        except OSError:  # the operator's view must never break training
            pass


class EventTail:
    """The events appended to ``path`` after this object was made, complete lines only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        """Events appended since the last call (malformed lines are skipped)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                out.append(event)
        return out


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as the coordinator reports them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _rounds(missed: list[int]) -> str:
    if len(missed) == 1:
        return f"round {missed[0]}"
    return f"rounds {missed[0]}-{missed[-1]}"


def describe(event: dict[str, Any]) -> str | None:
    """The operator's line for ``event`` (None: an event kind with no line)."""
    kind = event.get("event")
    if kind == "joined":
        what = (
            f"model {event.get('preset')} ({int(event.get('params', 0)):,} parameters), "
            f"codec {event.get('codec')}"
        )
        if event.get("resumed_round") is not None:
            return (
                f"rejoined run {event.get('run_id')} (resumed at round "
                f"{event['resumed_round']}): {what}"
            )
        return f"joined run {event.get('run_id')}: {what}"
    if kind == "round":
        line = ""
        missed = event.get("missed") or []
        if missed:
            line = f"left out of {_rounds(missed)}; rejoined: "
        loss = event.get("loss")
        return line + (
            f"round {event.get('round')} trained: {event.get('steps')} steps, loss "
            f"{'nan' if loss is None else f'{float(loss):.4f}'}, "
            f"{human_bytes(int(event.get('bytes_up', 0)))} up / "
            f"{human_bytes(int(event.get('bytes_down', 0)))} down, "
            f"{float(event.get('seconds', 0.0)):.1f}s"
        )
    if kind == "round_failed":
        return f"round {event.get('round')} not trained: {event.get('reason')}"
    if kind == "refused":
        return f"left run {event.get('run_id')}: {event.get('reason')}"
    if kind == "finished":
        return f"run {event.get('run_id')} finished (global version {event.get('version')})"
    return None


_NOISE = ("torch.distributed.elastic", "torchrun", "ChildFailedError", "error_file")


def failure_reason(work_dir: Path, log: Path) -> str:
    """The daemon's own one-line reason for failing: the error file a failing rank wrote, else
    the last ``SomeError: message`` line of its log that is not torchrun's own report."""
    try:
        first = (work_dir / ERROR_FILE).read_text().strip()
    except OSError:
        first = ""
    if first:
        return first
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines[-400:]):
        head, sep, _ = line.strip().partition(": ")
        name = head.rsplit(".", 1)[-1]
        if sep and name.endswith(("Error", "Exception")) and not any(n in line for n in _NOISE):
            return line.strip()
    return lines[-1].strip() if lines else "no reason logged"
