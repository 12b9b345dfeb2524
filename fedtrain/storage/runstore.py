"""The run store: content-addressed blobs + a SQLite index + the human-readable run directory.

Commit protocol for round r (phases named for crash tests, see :mod:`faults`):
1. ``round_started`` — index row r = started;
2. ``updates_stored`` — each silo's payload is a blob, indexed with validity and reason;
3. ``state_written`` — new global weights, outer-optimizer state, coordinator error feedback,
   the broadcast payload, and (every ``checkpoint_every`` rounds in simulation) every silo's
   state are blobs;
4. ``committed`` — ONE transaction marks r committed with the blob ids and metrics;
5. ``published`` — metrics.jsonl is appended and old rounds are pruned: in one index
   transaction (``pruned_index``) they stop referencing what retention does not keep, and only
   then are those blobs deleted (a crash in between leaves unreferenced blobs, never a
   reference to a missing one).
A crash anywhere loses at most round r; resume starts from the newest committed round whose
blobs all verify, marking corrupt ones in the index and falling back to an older checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load

from fedtrain.storage.blobstore import BlobCorrupted, BlobMissing, BlobStore
from fedtrain.storage.faults import KillSwitch
from fedtrain.storage.index import RunIndex
from fedtrain.storage.rundir import RunDir
from fedtrain.storage.tensorfile import safetensors_chunks

__all__ = ["NoCheckpoint", "RunStore", "StoredState"]

log = logging.getLogger(__name__)


class NoCheckpoint(RuntimeError):
    """The run has no committed, intact, resumable round."""


@dataclass(slots=True)
class StoredState:
    round: int
    """The committed round the state belongs to."""
    state: dict[str, Any]
    """Blob ids and JSON facts as committed."""


_STATE_BLOBS = ("silos", "engine")
"""State keys holding blob ids besides the ``*_blob`` ones."""


def _blob_ids(state: dict[str, Any]) -> set[str]:
    ids: set[str] = set()
    for key, value in state.items():
        if key.endswith("_blob") and isinstance(value, str):
            ids.add(value)
        elif key.endswith("_blobs") and isinstance(value, dict):  # e.g. one blob per tensor
            ids.update(v for v in value.values() if isinstance(v, str))
        elif key == "silos" and isinstance(value, dict):
            ids.update(v for v in value.values() if isinstance(v, str))
        elif key == "engine" and isinstance(value, dict):
            # Blobs an engine keeps inside its own state (work in flight, pending broadcasts).
            ids.update(v for v in value.get("blobs", []) if isinstance(v, str))
    return ids


class RunStore:
    """Durable, verifiable storage of one run."""

    def __init__(
        self,
        run_dir: Path,
        *,
        url: str = "",
        keep: int = 2,
        keep_updates: int = 2,
        keep_weights: int = 0,
        keep_aggregates: bool = False,
        fs: fsspec.AbstractFileSystem | None = None,
        kill: KillSwitch | None = None,
    ) -> None:
        self.dir = RunDir(run_dir)
        self.kill = kill or KillSwitch()
        self.blobs = BlobStore(
            url or f"file://{run_dir.resolve()}/blobs",
            fs=fs,
            on_tmp_written=lambda: self.kill.check("blob_tmp_written"),
        )
        self.index = RunIndex(run_dir / "index.sqlite")
        self.keep = keep
        self.keep_updates = keep_updates
        self.keep_weights = keep_weights
        self.keep_aggregates = keep_aggregates
        """Keep every round's aggregate (zeroth-order runs: it is the few-byte code log a late
        replica replays from the initial weights)."""
        self.cache: Any = None
        """A :class:`~fedtrain.storage.cache.MetadataCache` to prefetch into on commit."""

    # --------------------------------------------------------------- tensors
    def put_tensors(
        self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> str:
        """Store ``tensors`` as one safetensors blob, streamed from their memory; its id."""
        return self.blobs.put_chunks(safetensors_chunks(tensors, {"meta": json.dumps(meta or {})}))

    def get_tensors(self, blob_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        data = self.blobs.get(blob_id)
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
        return tensors, meta

    # ---------------------------------------------------------------- events
    def event(self, kind: str, **fields: Any) -> None:
        self.dir.event(kind, **fields)
        self.index.event(kind, fields)

    # ---------------------------------------------------------------- commit
    def start_round(self, rnd: int) -> None:
        self.kill.current_round = rnd
        self.index.start_round(rnd)
        self.kill.check("round_started")

    def store_update(
        self,
        rnd: int,
        silo: str,
        payload: bytes | None,
        *,
        valid: bool,
        reason: str | None,
        codec: str | None,
        weight: float | None,
    ) -> None:
        blob = self.blobs.put(payload) if payload else None
        self.index.record_update(
            rnd,
            silo,
            blob=blob,
            nbytes=len(payload or b""),
            codec=codec,
            valid=valid,
            reason=reason,
            weight=weight,
        )

    def commit(
        self,
        rnd: int,
        state: dict[str, Any],
        metrics: dict[str, Any],
        aggregate: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Steps 3-5 of the protocol (blobs in ``state`` must already be written).
        ``aggregate``: the round's mean update still in memory, for the cache (not re-read)."""
        self.kill.check("updates_stored")
        self.kill.check("state_written")
        self.index.commit_round(rnd, state, metrics)
        self.kill.check("committed")
        if self.cache is not None:
            self.cache.on_commit(rnd, aggregate)
            scores = {
                s: v["cosine_to_aggregate"]
                for (r, s), v in self.cache.stats.scalars.items()
                if r == rnd
            }
            self.event("silo_similarity", round=rnd, cosine_to_aggregate=scores)
        self.dir.metric(metrics)
        self.dir.event(
            "commit", round=rnd, tokens=metrics.get("tokens"), eval_loss=metrics.get("eval_loss")
        )
        self._prune()
        self.kill.check("published")

    def _prune(self) -> None:
        """Retention (``storage.keep_*``), applied after each commit:

        - full state for the last ``keep`` rounds and the newest resumable one;
        - each silo's update and the aggregate for the last ``keep_updates`` rounds, and the
          global weights for those and the round before them (what the metadata cache's
          workloads read: contribution of round r starts from the weights of r − 1);
        - the global weights of every ``keep_weights``-th round;
        - of every other round, its facts (metrics, bytes, validity) and no blobs.

        Disk use is then bounded by the model, whatever the number of rounds."""
        committed = self.index.committed_rounds()
        if not committed:
            return
        states = {r: self.index.round_state(r) for r in committed}
        live = [r for r in committed if not states[r].get("pruned")]
        full = set(live[-self.keep :])
        resumable = [r for r in live if "silos" in states[r]]
        if resumable:
            full.add(resumable[-1])
        recent = committed[-self.keep_updates :] if self.keep_updates else []
        first = recent[0] if recent else committed[-1] + 1
        changed: dict[int, dict[str, Any]] = {}
        for r in committed:
            if r in full:
                continue
            allowed = set()
            if r >= first or self.keep_aggregates:
                allowed.add("aggregate_blob")
            if r >= first - 1 or (self.keep_weights and r % self.keep_weights == 0):
                allowed.add("global_blob")
            slim = {
                k: v
                for k, v in states[r].items()
                if k in allowed or not (k.endswith(("_blob", "_blobs")) or k in _STATE_BLOBS)
            }
            slim["pruned"] = True
            if slim != states[r]:
                changed[r] = slim
        if not changed and not self.index.update_blobs_before(first):
            return
        gone: set[str] = set()
        for r in changed:
            gone |= _blob_ids(states[r])
        gone.update(self.index.retain(changed, updates_before=first))
        self.kill.check("pruned_index")
        referenced = self.index.update_blobs()
        for r in committed:
            referenced |= _blob_ids(changed.get(r, states[r]))
        initial = self.index.get_meta("initial_global_blob")
        if isinstance(initial, str):
            referenced.add(initial)
        for blob in sorted(gone - referenced):  # content-addressed: shared ids stay
            self.blobs.delete(blob)

    # ---------------------------------------------------------------- resume
    def latest_state(self, require_silos: bool) -> StoredState:
        """Newest committed round whose blobs all verify (corrupt ones are marked and skipped)."""
        for rnd in reversed(self.index.committed_rounds()):
            state = self.index.round_state(rnd)
            if state.get("pruned") or (require_silos and "silos" not in state):
                continue
            try:
                for blob in sorted(_blob_ids(state)):
                    self.blobs.get(blob)
            except (BlobCorrupted, BlobMissing) as e:
                reason = f"{type(e).__name__}: {e}"
                self.index.mark_corrupt(rnd, reason)
                self.event("checkpoint_corrupt", round=rnd, reason=reason)
                log.warning("round %d checkpoint unusable (%s); trying an older one", rnd, reason)
                continue
            return StoredState(round=rnd, state=state)
        raise NoCheckpoint(f"{self.dir.root}: no intact committed round to resume from")

    def rewind_to(self, rnd: int) -> None:
        """Forget everything after round ``rnd`` and rewrite metrics.jsonl from the index."""
        self.index.forget_after(rnd)
        rows = self.index.metrics()
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        self.dir.write_text("metrics.jsonl", text)
        # find, not ls: an object store has no empty directories (s3:// raises on ls).
        for leftover in self.blobs.fs.find(f"{self.blobs.root}/tmp"):
            self.blobs.fs.rm(leftover)
        self.sweep()

    def sweep(self) -> int:
        """Delete every stored blob nothing references (what a crash left: the blobs of a round
        that never committed, or of retention killed between its index transaction and the
        deletes); the number deleted. Run at resume, before anything new is written."""
        referenced = self.index.update_blobs()
        for rnd in self.index.committed_rounds():
            referenced |= _blob_ids(self.index.round_state(rnd))
        initial = self.index.get_meta("initial_global_blob")
        if isinstance(initial, str):
            referenced.add(initial)
        root, fs = self.blobs.root, self.blobs.fs
        stored = [p for p in fs.find(root) if not p.startswith(f"{root}/tmp/")]
        orphans = sorted({p.rsplit("/", 1)[-1] for p in stored} - referenced)
        for blob in orphans:
            self.blobs.delete(blob)
        if orphans:
            self.event("blobs_swept", count=len(orphans))
        return len(orphans)
