"""The run index: a SQLite file (WAL mode) describing everything in the blob store.

Tables: ``meta`` (schema version, run facts), ``rounds`` (status started/committed/corrupt, blob
ids of the committed state), ``updates`` (each silo's payload per round: blob, bytes, codec,
valid, rejection reason), ``metrics`` (one row per commit), ``events``. A round counts as
committed only when its row says so; that flip happens in one transaction, after every blob it
names is written.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "RunIndex"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('started', 'committed', 'corrupt')),
    started_at REAL NOT NULL,
    committed_at REAL,
    state TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    silo TEXT NOT NULL,
    blob TEXT,
    bytes INTEGER NOT NULL,
    codec TEXT,
    valid INTEGER NOT NULL,
    reason TEXT,
    weight REAL,
    PRIMARY KEY (round, silo)
);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER PRIMARY KEY, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    round INTEGER,
    silo TEXT,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
"""


class RunIndex:
    """SQLite index of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{path}: index schema version {version}, this fedtrain reads {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    # ---------------------------------------------------------------- rounds
    def start_round(self, rnd: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rounds (round, status, started_at) VALUES (?, 'started', ?)",
            (rnd, time.time()),
        )

    def commit_round(self, rnd: int, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Mark ``rnd`` committed with its state (blob ids) and metrics, atomically."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE rounds SET status = 'committed', committed_at = ?, state = ? "
                "WHERE round = ?",
                (time.time(), json.dumps(state), rnd),
            )
            self.db.execute(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?)", (rnd, json.dumps(metrics))
            )

    def mark_corrupt(self, rnd: int, reason: str) -> None:
        self.db.execute(
            "UPDATE rounds SET status = 'corrupt', reason = ? WHERE round = ?", (reason, rnd)
        )

    def committed_rounds(self) -> list[int]:
        rows = self.db.execute(
            "SELECT round FROM rounds WHERE status = 'committed' ORDER BY round"
        ).fetchall()
        return [r[0] for r in rows]

    def round_state(self, rnd: int) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT state FROM rounds WHERE round = ? AND status = 'committed'", (rnd,)
        ).fetchone()
        if row is None:
            raise KeyError(f"round {rnd} is not committed")
        return dict(json.loads(row[0]))

    def rounds(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT round, status, started_at, committed_at, reason FROM rounds ORDER BY round"
        )
        keys = [d[0] for d in cur.description]
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    def forget_after(self, rnd: int) -> None:
        """Drop rounds (and their updates/metrics) after ``rnd``: work that never committed."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for table in ("rounds", "updates", "metrics"):
                self.db.execute(f"DELETE FROM {table} WHERE round > ?", (rnd,))

    def retain(self, states: dict[int, dict[str, Any]], updates_before: int) -> list[str]:
        """In one transaction: replace the state of the rounds in ``states`` and forget the
        update blobs of every round before ``updates_before`` (their rows, bytes and validity
        stay). The update blob ids forgotten."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            dropped = [
                r[0]
                for r in self.db.execute(
                    "SELECT DISTINCT blob FROM updates WHERE round < ? AND blob IS NOT NULL",
                    (updates_before,),
                ).fetchall()
            ]
            self.db.execute(
                "UPDATE updates SET blob = NULL WHERE round < ? AND blob IS NOT NULL",
                (updates_before,),
            )
            for rnd, state in states.items():
                self.db.execute(
                    "UPDATE rounds SET state = ? WHERE round = ?", (json.dumps(state), rnd)
                )
        return dropped

    def update_blobs_before(self, rnd: int) -> bool:
        """Whether a round before ``rnd`` still references an update blob."""
        row = self.db.execute(
            "SELECT 1 FROM updates WHERE round < ? AND blob IS NOT NULL LIMIT 1", (rnd,)
        ).fetchone()
        return row is not None

    def update_blobs(self) -> set[str]:
        """Every update blob the index still references."""
        rows = self.db.execute("SELECT DISTINCT blob FROM updates WHERE blob IS NOT NULL")
        return {r[0] for r in rows.fetchall()}

    # --------------------------------------------------------------- updates
    def record_update(
        self,
        rnd: int,
        silo: str,
        *,
        blob: str | None,
        nbytes: int,
        codec: str | None,
        valid: bool,
        reason: str | None = None,
        weight: float | None = None,
    ) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rnd, silo, blob, nbytes, codec, int(valid), reason, weight),
        )

    def updates(self, rnd: int | None = None, silo: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT round, silo, blob, bytes, codec, valid, reason, weight FROM updates"
        cond: list[str] = []
        args: list[Any] = []
        if rnd is not None:
            cond.append("round = ?")
            args.append(rnd)
        if silo is not None:
            cond.append("silo = ?")
            args.append(silo)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        cur = self.db.execute(q + " ORDER BY round, silo", args)
        keys = [d[0] for d in cur.description]
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    # ------------------------------------------------------- metrics, events
    def metrics(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT m.row FROM metrics m JOIN rounds r ON r.round = m.round "
            "WHERE r.status = 'committed' ORDER BY m.round"
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO events (time, round, silo, kind, data) VALUES (?, ?, ?, ?, ?)",
            (time.time(), data.get("round"), data.get("silo"), kind, json.dumps(data)),
        )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT time, round, silo, kind, data FROM events"
        args: list[Any] = []
        if kind:
            q += " WHERE kind = ?"
            args.append(kind)
        rows = self.db.execute(q + " ORDER BY id", args).fetchall()
        return [
            {"time": t, "round": r, "silo": s, "event": k, **json.loads(d)}
            for t, r, s, k, d in rows
        ]
