"""Stream records into token shards: tokenised in batches by worker processes, resumable.

Records are read in a fixed order and tokenised by a pool of processes (at most two batches per
worker in flight, so memory stays bounded); the results are written in that same order. Every
``shard_tokens`` training tokens the current training shard and its eval shard are closed
(fsynced, renamed) and ``prepare-state.json`` records them with the position in the sources.
Killed and run again, a preparation continues after the last recorded shard and ends with the
same bytes as an uninterrupted one: nothing in the output depends on batching, worker count or
timing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.data.encode import Batch, Encoded, tokenised
from fedtrain.data.prepstate import (
    COUNTS,
    KEEP_BAD,
    STATE,
    PrepState,
    ShardFile,
    remove_leftovers,
    save_npy,
)
from fedtrain.data.shards import FORMAT, INDEX, file_sha256
from fedtrain.data.sources import BadRecord, Record
from fedtrain.storage.rundir import atomic_write_bytes

__all__ = ["PrepareError", "PrepareSummary", "write_shards"]


class PrepareError(ValueError):
    """Preparation stopped (``--strict`` bad record, other settings in the directory)."""


@dataclass(slots=True)
class PrepareSummary:
    out: Path
    tokens: int
    documents: int
    eval_tokens: int
    eval_documents: int
    shards: int
    bad_records: int
    bad_first: list[str]
    seconds: float
    resumed_shards: int
    already_done: bool = False


# --- the writer ------------------------------------------------------------------------------


@dataclass(slots=True)
class ShardJob:
    """Everything that decides the output bytes (recorded; a rerun must match it)."""

    out: Path
    tokenizer_path: Path
    vocab_size: int
    eod: int | None
    eval_fraction: float
    shard_tokens: int
    sources: list[dict[str, Any]]
    field_name: str
    total_bytes: int

    def fingerprint(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "sources": self.sources,
            "field": self.field_name,
            "eval_fraction": self.eval_fraction,
            "shard_tokens": self.shard_tokens,
            "tokenizer_sha256": file_sha256(self.tokenizer_path),
            "eod": self.eod,
        }


class _Writer:
    def __init__(self, job: ShardJob, state: PrepState, strict: bool) -> None:
        self.job = job
        self.state = state
        self.strict = strict
        self.dtype = np.dtype(np.uint16 if job.vocab_size <= 1 << 16 else np.uint32)
        self.stride = round(1 / job.eval_fraction) if job.eval_fraction > 0 else 0
        self.counts = (
            np.load(job.out / state.counts)
            if state.counts is not None
            else np.zeros(job.vocab_size, np.int64)
        )
        self.tokens = sum(int(s["tokens"]) for s in state.shards)
        self._open()

    def _open(self) -> None:
        n = len(self.state.shards)
        self.train = ShardFile(self.job.out / f"train-{n:05d}.bin", self.dtype)
        self.eval = ShardFile(self.job.out / f"eval-{n:05d}.bin", self.dtype)

    def _is_eval(self, doc: int) -> bool:
        return self.stride > 0 and doc % self.stride == self.stride // 2

    def bad(self, rec: BadRecord) -> None:
        if self.strict:
            raise PrepareError(f"bad record {rec.message()} (--strict)")
        st = self.state
        st.bad_count += 1
        if len(st.bad_first) < KEEP_BAD:
            st.bad_first.append(rec.message())
        st.position = (rec.file + 1, 0) if rec.ends_file else (rec.file, rec.line)

    def add(self, batch: Batch, encoded: Encoded) -> None:
        """Write one tokenised batch: each record's ids to the train or eval shard of its
        document, in runs of consecutive records; close the shard pair when it is full."""
        ids, lengths = encoded
        st = self.state
        k = pos = start = 0
        target: ShardFile | None = None
        for rec in batch:
            if isinstance(rec, BadRecord):
                if rec.ends_file and st.in_doc:
                    # The file broke inside its document: the document ends where it broke.
                    self._write(target, ids[start:pos])
                    target, start = None, pos
                    self._end_document()
                self.bad(rec)
                continue
            if not st.in_doc:
                st.documents += 1
            st.in_doc = not rec.last
            shard = self.eval if self._is_eval(st.documents - 1) else self.train
            if shard is not target:
                self._write(target, ids[start:pos])
                target, start = shard, pos
            pos += int(lengths[k])
            k += 1
            shard.documents += int(rec.last)
            st.position = (rec.file, rec.line)
            if shard is self.train and shard.tokens + pos - start >= self.job.shard_tokens:
                self._write(shard, ids[start:pos])
                self.checkpoint()
                target, start = None, pos
        self._write(target, ids[start:pos])

    def _end_document(self) -> None:
        st = self.state
        shard = self.eval if self._is_eval(st.documents - 1) else self.train
        if self.job.eod is not None:
            self._write(shard, np.array([self.job.eod], np.uint32))
        shard.documents += 1
        st.in_doc = False

    def _write(self, shard: ShardFile | None, ids: np.ndarray) -> None:
        if shard is None or not len(ids):
            return
        shard.write(ids)
        if shard is self.train:
            self.counts += np.bincount(ids, minlength=len(self.counts))[: len(self.counts)]

    def checkpoint(self, final: bool = False) -> None:
        """Close the current shard pair and record it with the position after it."""
        entry, eval_entry = self.train.close(), self.eval.close()
        if entry is not None:
            self.state.shards.append(entry)
            self.tokens += entry["tokens"]
        elif eval_entry is not None:
            # Held-out text with no training text after it: still a numbered pair.
            self.state.shards.append({"file": None, "tokens": 0, "documents": 0, "sha256": None})
        if eval_entry is not None:
            self.state.eval_shards.append(eval_entry)
        # The counts go in a file of their own name, written before the state that names it:
        # a kill anywhere leaves the state and its counts consistent.
        old = self.state.counts
        self.state.counts = f"counts-{len(self.state.shards):05d}.npy"
        save_npy(self.job.out / self.state.counts, self.counts)
        atomic_write_bytes(self.job.out / STATE, json.dumps(self.state.to_json()).encode())
        if old is not None and old != self.state.counts:
            (self.job.out / old).unlink(missing_ok=True)
        if not final:
            self._open()


def _load_state(job: ShardJob) -> PrepState:
    """The recorded progress in ``job.out`` (fresh when there is none); leftovers of a crash
    (unrecorded shard files) are removed so they are written again, identically."""
    fp = job.fingerprint()
    path = job.out / STATE
    state = PrepState(job=fp)
    if path.exists():
        try:
            old = PrepState.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise PrepareError(
                f"{path} is not a preparation state this version can read ({type(e).__name__}: "
                f"{e}); delete {job.out} and prepare again"
            ) from None
        if old.job != fp:
            raise PrepareError(
                f"{job.out} holds an unfinished preparation of other sources or settings; "
                "run it with those, delete the directory, or choose another --out"
            )
        state = old
    keep = {s["file"] for s in [*state.shards, *state.eval_shards] if s["file"]}
    if state.counts is not None:
        keep.add(state.counts)
    for name in sorted(keep):
        if not (job.out / name).exists():
            raise PrepareError(
                f"{job.out / name} is recorded in {path} but missing; delete {job.out} and "
                "prepare again"
            )
    remove_leftovers(job.out, keep)
    return state


def write_shards(
    job: ShardJob,
    records: Callable[[tuple[int, int], list[int]], Iterator[Record | BadRecord]],
    *,
    workers: int,
    strict: bool = False,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> PrepareSummary:
    """Write ``job.out`` from ``records(start, byte_counter)``; resume when state is there.

    ``on_progress(bytes_read, tokens, documents)`` is called after each batch."""
    t0 = time.monotonic()
    job.out.mkdir(parents=True, exist_ok=True)
    done = _finished(job)
    if done is not None:
        return done
    state = _load_state(job)
    resumed = len(state.shards)
    w = _Writer(job, state, strict)
    counter = [0]
    stream = records(state.position, counter)
    for batch, encoded in tokenised(stream, job.tokenizer_path, job.eod, workers, PrepareError):
        w.add(batch, encoded)
        if on_progress is not None:
            on_progress(counter[0], w.tokens + w.train.tokens + w.eval.tokens, state.documents)
    w.checkpoint(final=True)
    index = _write_index(job, state, w.counts)
    summary = _summary_from_index(job.out, index, time.monotonic() - t0)
    summary.resumed_shards = resumed
    return summary


def _write_index(job: ShardJob, state: PrepState, counts: np.ndarray) -> dict[str, Any]:
    save_npy(job.out / COUNTS, counts)
    shards = [s for s in state.shards if s["file"]]
    train_tokens = sum(s["tokens"] for s in shards)
    train_docs = sum(s["documents"] for s in shards)
    eval_tokens = sum(s["tokens"] for s in state.eval_shards)
    eval_docs = sum(s["documents"] for s in state.eval_shards)
    index = {
        "format": FORMAT,
        "tokens": train_tokens + eval_tokens,
        "documents": train_docs + eval_docs,
        "dtype": np.dtype(np.uint16 if job.vocab_size <= 1 << 16 else np.uint32).name,
        "vocab_size": job.vocab_size,
        "eod": job.eod,
        "tokenizer": {"file": job.tokenizer_path.name, "sha256": file_sha256(job.tokenizer_path)},
        "sources": job.sources,
        "field": job.field_name,
        "shard_tokens": job.shard_tokens,
        "train": {"tokens": train_tokens, "documents": train_docs},
        "shards": shards,
        "eval": {
            "fraction": job.eval_fraction,
            "tokens": eval_tokens,
            "documents": eval_docs,
            "shards": state.eval_shards,
        },
        "bad_records": {"count": state.bad_count, "first": state.bad_first},
        "unigram_counts": COUNTS,
        "job": state.job,
    }
    atomic_write_bytes(job.out / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    # Only now is the state no longer needed (a kill before this resumes from the state).
    (job.out / STATE).unlink(missing_ok=True)
    if state.counts is not None:
        (job.out / state.counts).unlink(missing_ok=True)
    return index


def _finished(job: ShardJob) -> PrepareSummary | None:
    """The summary of a finished preparation of this job in ``job.out`` (None when there is
    none); PrepareError when ``job.out`` holds a finished preparation of something else."""
    path = job.out / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise PrepareError(f"{path} is not valid JSON ({e}); delete {job.out}") from None
    if not isinstance(index, dict) or index.get("job") != job.fingerprint():
        raise PrepareError(
            f"{job.out} already holds a preparation of other sources or settings; "
            "delete it or choose another --out"
        )
    try:
        summary = _summary_from_index(job.out, index, 0.0)
    except (KeyError, TypeError) as e:
        raise PrepareError(f"{path} lacks {e}; delete {job.out} and prepare again") from None
    summary.already_done = True
    # Killed after the index was written: what only the state needed is removed.
    recorded = [*index["shards"], *index["eval"]["shards"]]
    remove_leftovers(job.out, keep={s["file"] for s in recorded})
    (job.out / STATE).unlink(missing_ok=True)
    return summary


def _summary_from_index(out: Path, index: dict[str, Any], seconds: float) -> PrepareSummary:
    return PrepareSummary(
        out=out,
        tokens=index["train"]["tokens"],
        documents=index["train"]["documents"],
        eval_tokens=index["eval"]["tokens"],
        eval_documents=index["eval"]["documents"],
        shards=len(index["shards"]),
        bad_records=index["bad_records"]["count"],
        bad_first=index["bad_records"]["first"],
        seconds=seconds,
        resumed_shards=0,
    )
