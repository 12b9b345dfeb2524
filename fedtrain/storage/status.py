"""Where a run stands, read from its directory while it runs (``fedtrain status``, the page).

Everything comes from the run index (SQLite, opened read-only: the coordinator keeps writing)
and the run's config: the newest committed round and the one in progress, tokens against the
budget, losses and bytes per round, and per silo its last reply (round, bytes, loss, when),
strikes, stragglers, quarantine and similarity to the aggregate. The ETA is the median of the
last rounds' durations times the rounds left.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["run_status"]

_HISTORY = 2000
"""Rounds of history returned (the newest): enough for charts, bounded for long runs."""


def _rows(db: sqlite3.Connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return db.execute(sql, args).fetchall()


def _open(run_dir: Path) -> sqlite3.Connection:
    path = run_dir / "index.sqlite"
    if not path.exists():
        raise ValueError(f"{run_dir} is not a run directory (index.sqlite missing)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)


def _silos(db: sqlite3.Connection, names: list[str], totals: dict[str, Any]) -> list[dict]:
    last: dict[str, dict[str, Any]] = {}
    for t, rnd, silo, data in _rows(
        db,
        "SELECT time, round, silo, data FROM events WHERE id IN "
        "(SELECT MAX(id) FROM events WHERE kind = 'reply' GROUP BY silo)",
    ):
        d = json.loads(data)
        last[silo] = {"round": rnd, "time": t, "bytes_up": d.get("bytes_up"), **d}
    late = dict(
        _rows(db, "SELECT silo, COUNT(*) FROM events WHERE kind = 'straggler' GROUP BY silo")
    )
    cos: dict[str, float] = {}
    for (data,) in _rows(
        db, "SELECT data FROM events WHERE kind = 'silo_similarity' ORDER BY id DESC LIMIT 1"
    ):
        cos = json.loads(data).get("cosine_to_aggregate", {})
    strikes, quarantined = totals.get("strikes", {}), totals.get("quarantined", {})
    out = []
    for name in sorted(set(names) | set(last), key=lambda s: (len(s), s)):
        reply = last.get(name, {})
        out.append(
            {
                "silo": name,
                "last_round": reply.get("round"),
                "last_reply_at": reply.get("time"),
                "bytes_up": reply.get("bytes_up"),
                "train_loss": reply.get("train_loss"),
                "tokens": reply.get("tokens"),
                "strikes": int(strikes.get(name, 0)),
                "stragglers": int(late.get(name, 0)),
                "quarantined": name in quarantined,
                "cosine_to_aggregate": cos.get(name),
            }
        )
    return out


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """The run's status as one JSON-able dict (see the module docstring)."""
    from fedtrain.config import load_config
    from fedtrain.run import expected_rounds

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise ValueError(f"{run_dir} is not a run directory (config.toml missing)")
    cfg = load_config(run_dir / "config.toml")
    now = time.time() if now is None else now
    db = _open(run_dir)
    try:
        rounds = _rows(
            db, "SELECT round, status, started_at, committed_at, state FROM rounds ORDER BY round"
        )
        committed = [r for r in rounds if r[1] == "committed"]
        history = [
            json.loads(row)
            for (row,) in _rows(
                db,
                "SELECT m.row FROM metrics m JOIN rounds r ON r.round = m.round "
                "WHERE r.status = 'committed' ORDER BY m.round DESC LIMIT ?",
                _HISTORY,
            )
        ][::-1]
        totals = json.loads(committed[-1][4]).get("totals", {}) if committed else {}
        silos = _silos(db, cfg.silo_names(), totals)
        started = _rows(db, "SELECT MIN(time) FROM events WHERE kind = 'run_start'")[0][0]
    finally:
        db.close()
    last = committed[-1][0] if committed else 0
    in_progress = next((r[0] for r in rounds if r[1] == "started" and r[0] > last), None)
    expected = expected_rounds(cfg)
    durations = [r[3] - r[2] for r in committed[-10:] if r[3] is not None]
    finished = (run_dir / "summary.json").exists()
    end = committed[-1][3] if finished and committed and committed[-1][3] else now
    failure = run_dir / "failure.txt"
    left = max(0, expected - last)
    eta = None if finished or not durations else statistics.median(durations) * left
    newest = history[-1] if history else {}
    state = "finished" if finished else "failed" if failure.exists() else "running"
    if not committed and not finished and state == "running":
        state = "starting"
    return {
        "run_dir": str(run_dir),
        "name": cfg.run.name,
        "strategy": cfg.strategy.name,
        "codec": cfg.transport.codec,
        "state": state,
        "failure": failure.read_text().strip() if failure.exists() else None,
        "round": last,
        "in_progress": in_progress,
        "expected_rounds": expected,
        "tokens": int(totals.get("tokens", 0)),
        "token_budget": cfg.run.token_budget or None,
        "train_loss": newest.get("train_loss"),
        "eval_loss": newest.get("eval_loss"),
        "bytes_up": int(totals.get("bytes_up", 0)),
        "bytes_down": int(totals.get("bytes_down", 0)),
        "stragglers": int(totals.get("stragglers", 0)),
        "rejected": int(totals.get("rejected", 0)),
        "elapsed_s": None if started is None else end - started,
        "eta_s": eta,
        "silos": silos,
        "history": [
            {k: row.get(k) for k in ("round", "tokens", "train_loss", "eval_loss")}
            | {"bytes_up": row.get("bytes_up"), "bytes_down": row.get("bytes_down")}
            for row in history
        ],
        "time": now,
    }
