"""Tokenising records in batches, in worker processes, in order, with bounded memory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.data.sources import BadRecord, Record

__all__ = ["BATCH_BYTES", "Encoded", "encode_batch", "encode_texts", "tokenised"]

BATCH_BYTES = 1 << 20
"""Text per batch sent to a worker."""
RECORD_COST = 64
"""What each record adds to a batch's size besides its text (so empty and bad records
also close batches)."""

Batch = list[Record | BadRecord]
Encoded = tuple[np.ndarray, np.ndarray]
"""Token ids of a batch's good records concatenated (end-of-document tokens included), and the
number of ids of each good record."""

_WORKER: Any = None


def _init_worker(tok_path: str, eod: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from fedtrain.data.tokenizer import load_tokenizer

    global _WORKER
    _WORKER = (load_tokenizer(Path(tok_path)), eod)


def encode_texts(tok: Any, texts: list[str]) -> list[list[int]] | list[bytes]:
    """Token ids of each text (no end-of-document token): lists, or bytes for bytes."""
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch(texts)  # type: ignore[no-any-return]
    return [t.encode("utf-8") for t in texts]


def encode_batch(tok: Any, eod: int | None, texts: list[str], lasts: list[bool]) -> Encoded:
    """:data:`Encoded` of ``texts``; ``eod`` follows each text whose ``lasts`` entry is set."""
    seqs = encode_texts(tok, texts)
    end = -1 if eod is None else eod
    extra = [1 if (last and end >= 0) else 0 for last in lasts]
    lengths = np.fromiter(
        (len(x) + e for x, e in zip(seqs, extra, strict=True)), np.int64, len(seqs)
    )
    ids = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for seq, e in zip(seqs, extra, strict=True):
        n = len(seq)
        ids[pos : pos + n] = np.frombuffer(seq, np.uint8) if isinstance(seq, bytes) else seq
        pos += n
        if e:
            ids[pos] = end
            pos += 1
    return ids, lengths


def _encode_in_worker(texts: list[str], lasts: list[bool]) -> Encoded:
    tok, eod = _WORKER
    return encode_batch(tok, eod, texts, lasts)


def _good(batch: Batch) -> tuple[list[str], list[bool]]:
    good = [r for r in batch if isinstance(r, Record)]
    return [r.text for r in good], [r.last for r in good]


def tokenised(
    stream: Iterator[Record | BadRecord],
    tok_path: Path,
    eod: int | None,
    workers: int,
    error: type[Exception] = RuntimeError,
) -> Iterator[tuple[Batch, Encoded]]:
    """Batches of ``stream`` in order with their :data:`Encoded` ids, tokenised by
    ``workers`` processes (in this process when 0), at most two batches per worker in flight."""
    batches = _batches(stream)
    if workers <= 0:
        from fedtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        for batch in batches:
            yield batch, encode_batch(tok, eod, *_good(batch))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(str(tok_path), eod)
    )
    try:
        pending: deque[tuple[Batch, Any]] = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, *_good(batch))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.result()
        while pending:
            done, result = pending.popleft()
            yield done, result.result()
    except BrokenProcessPool:
        raise error(
            "a tokenising worker died (out of memory?); finished shards are kept: run the "
            "same command again to continue, perhaps with fewer --workers"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(stream: Iterator[Record | BadRecord]) -> Iterator[Batch]:
    batch: Batch = []
    size = 0
    for rec in stream:
        batch.append(rec)
        size += RECORD_COST + (len(rec.text) if isinstance(rec, Record) else 0)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
