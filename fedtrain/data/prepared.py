"""``fedtrain data prepare`` and the silo's data cache: raw sources into a prepared directory.

:func:`prepare_sources` is the command: sources, a tokenizer choice, an output directory.
:func:`open_tokens` is what training uses: a prepared directory is opened (and verified) as
it is; raw sources are prepared once, with the run's tokenizer, into a cache directory keyed by
the sources and the tokenizer's hash, and opened from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.data.shards import INDEX, TokenShards, file_sha256, is_prepared
from fedtrain.data.sources import (
    BadRecord,
    Record,
    SourceFile,
    expand_sources,
    read_records,
    source_fingerprint,
)
from fedtrain.data.tokenizer import ByteTokenizer, eod_id, load_tokenizer, train_bpe
from fedtrain.data.writer import STATE, PrepareError, PrepareSummary, ShardJob, write_shards

__all__ = [
    "TokenizerChoice",
    "cache_root",
    "open_documents",
    "open_tokens",
    "prepare_sources",
    "sample_texts",
]

DEFAULT_SHARD_TOKENS = 1 << 26
"""Training tokens per shard (128 MB of uint16): the unit of resumption."""
DEFAULT_BPE_SAMPLE_BYTES = 256 << 20
"""Text sampled from the sources to train a BPE (``--bpe-sample-bytes``)."""


@dataclass(frozen=True, slots=True)
class TokenizerChoice:
    """One of: an existing ``tokenizer.json`` (``file``), a BPE trained on a sample of the
    sources (``bpe_vocab``), or bytes (``byte``)."""

    file: Path | None = None
    bpe_vocab: int = 0
    bpe_sample_bytes: int = DEFAULT_BPE_SAMPLE_BYTES
    byte: bool = False

    def spec(self) -> dict[str, Any]:
        if self.file is not None:
            return {"kind": "file", "sha256": file_sha256(self.file)}
        if self.bpe_vocab:
            return {"kind": "bpe", "vocab": self.bpe_vocab, "sample": self.bpe_sample_bytes}
        return {"kind": "byte"}


def sample_texts(files: list[SourceFile], field: str, budget: int) -> Iterator[str]:
    """Up to ``budget`` characters of text, the same share from the start of every file."""
    per_file = max(1, budget // max(1, len(files)))
    for i in range(len(files)):
        taken = 0
        for rec in read_records(files[i : i + 1], field):
            if isinstance(rec, Record):
                yield rec.text[: per_file - taken]
                taken += len(rec.text)
                if taken >= per_file:
                    break


def _tokenizer_into(
    out: Path, choice: TokenizerChoice, files: list[SourceFile], field: str
) -> Path:
    """Put the tokenizer in ``out/tokenizer.json`` (kept from an earlier, interrupted run of the
    same choice, so a resumed preparation uses the very same file)."""
    path = out / "tokenizer.json"
    spec_path = out / "tokenizer.spec.json"
    spec = choice.spec()
    if path.exists() and spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return path
    if (out / INDEX).exists() or (out / STATE).exists():
        raise PrepareError(
            f"{out} holds a preparation made with another tokenizer choice; run it with that "
            "one, delete the directory, or choose another --out"
        )
    tmp = out / ".tokenizer.json.tmp"
    if choice.file is not None:
        load_tokenizer(choice.file)  # a clear error now when it is not a tokenizer
        shutil.copyfile(choice.file, tmp)
    elif choice.bpe_vocab:
        tok = train_bpe(
            sample_texts(files, field, choice.bpe_sample_bytes),
            choice.bpe_vocab,
            special_tokens=["<|endoftext|>"],
        )
        tok.save(tmp)
    else:
        ByteTokenizer(eod=True).save(tmp)
    os.replace(tmp, path)
    spec_path.write_text(json.dumps(spec) + "\n")
    return path


def _records_of(files: list[SourceFile], field: str) -> Callable[..., Iterator[Record | BadRecord]]:
    def records(start: tuple[int, int], counter: list[int]) -> Iterator[Record | BadRecord]:
        return read_records(files, field, start, counter)

    return records


def prepare_sources(
    srcs: list[str],
    out: Path,
    choice: TokenizerChoice,
    *,
    workers: int | None = None,
    eval_fraction: float = 0.01,
    field: str = "text",
    strict: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> PrepareSummary:
    """Tokenise ``srcs`` into shards in ``out`` (see :mod:`fedtrain.data.writer`)."""
    if not 0.0 <= eval_fraction < 0.5:
        raise PrepareError(f"--eval-fraction must be in [0, 0.5), got {eval_fraction}")
    files = expand_sources(srcs)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = _tokenizer_into(out, choice, files, field)
    tok = load_tokenizer(tok_path)
    job = ShardJob(
        out=out,
        tokenizer_path=tok_path,
        vocab_size=tok.vocab_size,
        eod=eod_id(tok),
        eval_fraction=eval_fraction,
        shard_tokens=shard_tokens,
        sources=source_fingerprint(files),
        field_name=field,
        total_bytes=sum(f.size for f in files),
    )
    n = workers if workers is not None else (os.cpu_count() or 1)
    with _Progress(job.total_bytes, enabled=progress, label=str(out)) as bar:
        return write_shards(
            job, _records_of(files, field), workers=n, strict=strict, on_progress=bar.update
        )


class _Progress:
    """Progress on stderr: bytes read of the total, tokens, tokens/s, documents. A bar on a
    terminal; a line every 10 s otherwise (logs)."""

    def __init__(self, total_bytes: int, enabled: bool, label: str) -> None:
        self.enabled = enabled and total_bytes > 0
        self.bar = self.enabled and sys.stderr.isatty()
        self.total = total_bytes
        self.label = label
        self._t0 = time.monotonic()
        self._last = 0.0 if self.bar else self._t0

    def __enter__(self) -> _Progress:
        if self.bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                TextColumn("preparing"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[tokens]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._p.add_task("prepare", total=self.total, tokens="")
            self._p.start()
        return self

    def update(self, read: int, tokens: int, documents: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < (0.2 if self.bar else 10.0):
            return
        self._last = now
        rate = tokens / max(now - self._t0, 1e-9)
        text = f"{tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tok/s, {documents:,} docs"
        if self.bar:
            self._p.update(self._task, completed=min(read, self.total), tokens=text)
        else:
            pct = 100.0 * min(read, self.total) / self.total
            print(
                f"preparing {self.label}: {pct:.1f}% of {self.total:,} bytes, {text}",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self._p.update(self._task, completed=self.total)
            self._p.stop()


# --- what training opens ----------------------------------------------------------------------


def cache_root() -> Path:
    """Where raw sources are prepared for training (``FEDTRAIN_DATA_CACHE``, default
    ``~/.cache/fedtrain/data``)."""
    env = os.environ.get("FEDTRAIN_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedtrain" / "data"


def open_tokens(
    source: str, tokenizer_path: Path, *, progress: bool = False, workers: int | None = None
) -> TokenShards:
    """The token shards of ``source`` for a run whose tokenizer is ``tokenizer_path``.

    A prepared directory must have been made with that very tokenizer (same sha256). Raw
    sources are prepared once into :func:`cache_root` / a key of the sources (names, sizes,
    modification times) and the tokenizer's hash, under a lock (ranks of one silo wait for the
    first), with no eval split: all of it is training text, as the run's data."""
    tok_sha = file_sha256(tokenizer_path)
    if is_prepared(source):
        shards = TokenShards.open(source)
        if shards.tokenizer_sha256 != tok_sha:
            raise PrepareError(
                f"{source} was prepared with another tokenizer ({shards.tokenizer_path}, sha256 "
                f"{shards.tokenizer_sha256[:12]}) than this run's ({tok_sha[:12]}); prepare it "
                "again with --tokenizer set to the run's tokenizer.json"
            )
        return shards
    files = expand_sources([source])
    key = _key({"sources": source_fingerprint(files), "tokenizer": tok_sha})

    def prepare(out: Path) -> None:
        prepare_sources(
            [source],
            out,
            TokenizerChoice(file=out / "tokenizer.json"),
            workers=workers,
            eval_fraction=0.0,
            progress=progress,
        )

    return _cached(key, tokenizer_path, prepare)


def open_documents(texts: list[str], tokenizer_path: Path) -> TokenShards:
    """Documents already in memory (a silo's share of the shared corpus) as token shards in
    the cache, keyed by their text and the tokenizer; concatenated as the tokenizer has it (an
    end-of-document token only where it has one)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    tok_sha = file_sha256(tokenizer_path)
    sources = [{"documents": len(texts), "sha256": h.hexdigest()}]
    key = _key({"documents": sources, "tokenizer": tok_sha})

    def records(start: tuple[int, int], counter: list[int]) -> Iterator[Record | BadRecord]:
        for k in range(start[1], len(texts)):
            counter[0] += len(texts[k])
            yield Record(0, k + 1, texts[k], True)

    def prepare(out: Path) -> None:
        tok = load_tokenizer(out / "tokenizer.json")
        job = ShardJob(
            out=out,
            tokenizer_path=out / "tokenizer.json",
            vocab_size=tok.vocab_size,
            eod=eod_id(tok),
            eval_fraction=0.0,
            shard_tokens=DEFAULT_SHARD_TOKENS,
            sources=sources,
            field_name="",
            total_bytes=0,
        )
        write_shards(job, records, workers=0)

    return _cached(key, tokenizer_path, prepare)


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _cached(key: str, tokenizer_path: Path, prepare: Callable[[Path], None]) -> TokenShards:
    """The prepared directory ``cache_root() / key``, made by ``prepare`` (given the directory
    holding a copy of the tokenizer) under a lock when it is not there yet."""
    from fedtrain.runtime.files import hold_lock

    out = cache_root() / key
    lock = hold_lock(cache_root() / f"{key}.lock", wait_s=24 * 3600.0)
    try:
        if not is_prepared(out):
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tokenizer_path, out / "tokenizer.json")
            (out / "tokenizer.spec.json").write_text(
                json.dumps({"kind": "file", "sha256": file_sha256(tokenizer_path)}) + "\n"
            )
            prepare(out)
    finally:
        if lock is not None:
            lock.close()
    return TokenShards.open(out)
