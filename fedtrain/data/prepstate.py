"""What a preparation in progress keeps on disk: its state, its shard files, its counts.

``prepare-state.json`` names the finished shard pairs, the position in the sources after them,
and the unigram counts file written with it; anything else the writer left (a ``.part`` shard,
an unrecorded shard or counts file, a temporary) is removed on resume and written again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.storage.rundir import atomic_write_bytes

__all__ = ["COUNTS", "KEEP_BAD", "STATE", "remove_leftovers", "save_npy"]

STATE = "prepare-state.json"
COUNTS = "counts.npy"
OWN = re.compile(r"^(?:(?:train|eval)-\d{5}\.bin(?:\.part)?|counts-\d{5}\.npy|\..+\.tmp\d+)$")
"""Files a preparation writes before recording them (removed on resume when not recorded)."""
KEEP_BAD = 20
"""Bad records named in the summary (all are counted)."""


@dataclass(slots=True)
class PrepState:
    job: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)
    eval_shards: list[dict[str, Any]] = field(default_factory=list)
    position: tuple[int, int] = (0, 0)
    documents: int = 0
    """Documents started so far (the eval split is every ``stride``-th)."""
    in_doc: bool = False
    bad_count: int = 0
    bad_first: list[str] = field(default_factory=list)
    counts: str | None = None
    """The unigram counts of the recorded training shards (a file written with the state)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "shards": self.shards,
            "eval_shards": self.eval_shards,
            "position": list(self.position),
            "documents": self.documents,
            "in_doc": self.in_doc,
            "bad_count": self.bad_count,
            "bad_first": self.bad_first,
            "counts": self.counts,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PrepState:
        return cls(
            job=d["job"],
            shards=d["shards"],
            eval_shards=d["eval_shards"],
            position=(int(d["position"][0]), int(d["position"][1])),
            documents=int(d["documents"]),
            in_doc=bool(d["in_doc"]),
            bad_count=int(d["bad_count"]),
            bad_first=list(d["bad_first"]),
            counts=d["counts"],
        )


class ShardFile:
    """One shard file being written: a ``.part`` file, renamed when closed."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.dtype = dtype
        self.f = self.part.open("wb")
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += len(ids)

    def close(self) -> dict[str, Any] | None:
        """Finish the file; its index entry, or None (and no file) when it holds no tokens."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if self.tokens == 0:
            self.part.unlink()
            return None
        os.replace(self.part, self.path)
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "sha256": self.sha.hexdigest(),
        }


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def remove_leftovers(out: Path, keep: set[str]) -> None:
    """Remove what a killed preparation wrote and did not record (it is written again)."""
    for p in out.iterdir():
        if OWN.match(p.name) and p.name not in keep:
            p.unlink()
