"""The silo daemon's per-round state snapshots: ``runs/<run id>/round-<r>/`` in its work dir.

After each round's work the daemon writes its whole state (worker and trainer tensors, the
sharded optimizer state of every rank, its global version) and keeps the last few, so that a
coordinator resuming from an earlier commit finds the silo's state from before that round.
Writes are atomic: a temp directory, then a rename.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["KEEP_SNAPSHOTS", "Snapshots", "work_round_of"]

KEEP_SNAPSHOTS = 2
"""Snapshots kept per run (the newest ones)."""


def work_round_of(snapshot: Path) -> int:
    """The round a snapshot directory (``round-<r>``) was written after."""
    return int(snapshot.name.removeprefix("round-"))


class Snapshots:
    """The snapshots of one run, in ``run_dir``."""

    def __init__(self, run_dir: Path, keep: int = KEEP_SNAPSHOTS) -> None:
        self.run_dir = run_dir
        self.keep = keep

    @staticmethod
    def exist(run_dir: Path) -> bool:
        """Whether ``run_dir`` holds at least one complete snapshot."""
        return any((p / "state.json").exists() for p in run_dir.glob("round-*"))

    def paths(self) -> list[Path]:
        """Complete snapshots, oldest first."""
        return sorted(p for p in self.run_dir.glob("round-*") if (p / "state.json").exists())

    def before(self, rnd: int) -> Path | None:
        """The newest snapshot written before round ``rnd``'s work (None: none that old)."""
        earlier = [s for s in self.paths() if work_round_of(s) < rnd]
        return earlier[-1] if earlier else None

    def write(self, worker: Any, version: int, work_round: int) -> None:
        """Write ``worker``'s whole state after ``work_round`` (holding global ``version``) and
        drop all but the newest :attr:`keep` snapshots."""
        from safetensors.torch import save_file

        final = self.run_dir / f"round-{work_round:06d}"
        tmp = self.run_dir / f".tmp-round-{work_round:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, meta = worker.state_tensors()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rank0.safetensors"))
        worker.trainer.save_shards(tmp)
        state = {"version": version, "work_round": work_round, "meta": meta}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.paths()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def restore(worker: Any, snap: Path) -> tuple[int, int]:
        """Load ``snap`` into ``worker``; returns its ``(version, work_round)``."""
        from safetensors.torch import load_file

        state = json.loads((snap / "state.json").read_text())
        worker.load_state_tensors(load_file(str(snap / "rank0.safetensors")), state["meta"])
        worker.trainer.load_shards(snap)
        return int(state["version"]), int(state["work_round"])

    def versions(self) -> list[list[int]]:
        """``[work_round, version]`` of each kept snapshot, oldest first."""
        out = []
        for snap in self.paths():
            state = json.loads((snap / "state.json").read_text())
            out.append([int(state["work_round"]), int(state["version"])])
        return out
