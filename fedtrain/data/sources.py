"""Text sources read as a stream of records: files, globs, directories and fsspec URLs.

Formats by file name: ``.txt`` (one document per file; a large file arrives in line-aligned
pieces so it is never held whole), ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one document
per line, the ``text`` field or another), ``.parquet`` (one document per row, read by row
groups: the layout of Hugging Face datasets). Nothing reads more than one batch ahead, so memory
does not grow with the corpus.

A record that cannot be used (invalid JSON, missing field, bytes that are not UTF-8, a file that
cannot be read) is yielded as a :class:`BadRecord` naming ``file:line``; the caller counts it or
stops on it (``--strict``).
"""

from __future__ import annotations

import codecs
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from fedtrain.data.corpus import CorpusError

__all__ = [
    "BadRecord",
    "Record",
    "SourceError",
    "SourceFile",
    "expand_sources",
    "read_records",
    "FORMATS",
]

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
"""File name endings that are read; anything else under a directory is skipped."""

TXT_PIECE_BYTES = 8 << 20
"""A .txt file is read in pieces of about this many bytes, cut before a space that precedes a
letter: the pre-tokenisers of byte-level BPEs (GPT-2's and Llama 3's patterns) and
SentencePiece's Metaspace start a new pre-token there, so the pieces tokenise as the whole file
does. Text with no such place (no spaces: Chinese, Japanese) is cut after a line break
followed by a non-space character; text with neither in :data:`TXT_MAX_PIECES` pieces is cut
where the bytes reach that size (memory stays bounded; a token there may differ)."""
TXT_MAX_PIECES = 4


class SourceError(CorpusError, ValueError):
    """A source cannot be used at all (nothing matches, unknown format); names the source."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    url: str
    """Full fsspec URL of one file (``file:///...`` for local paths)."""
    name: str
    """Its path as shown in messages."""
    size: int
    """Its size in bytes (compressed size for compressed files)."""
    fmt: str
    """One of :data:`FORMATS`."""


@dataclass(frozen=True, slots=True)
class Record:
    """One piece of text. A document is one or more records; ``last`` closes it."""

    file: int
    """Index of the source file."""
    line: int
    """1-based record number in that file (line for jsonl, row for parquet, piece for txt)."""
    text: str
    last: bool
    """True when the document ends with this record."""


@dataclass(frozen=True, slots=True)
class BadRecord:
    file: int
    line: int
    where: str
    """``file:line``."""
    reason: str
    ends_file: bool = False
    """True when nothing more is read from this file (it could not be opened or read on)."""

    def message(self) -> str:
        return f"{self.where}: {self.reason}"


def _format(path: str) -> str | None:
    low = path.lower()
    return next((f for f in sorted(FORMATS, key=len, reverse=True) if low.endswith(f)), None)


def expand_sources(srcs: list[str]) -> list[SourceFile]:
    """The files named by ``srcs`` (paths, globs, directories, fsspec URLs), in a fixed order:
    the sources as given, each one's matches sorted. SourceError names a source that matches
    nothing or a file of an unknown format."""
    import fsspec

    out: list[SourceFile] = []
    for src in srcs:
        try:
            fs, _, paths = fsspec.get_fs_token_paths(src)
        except (OSError, ValueError, ImportError) as e:
            raise SourceError(f"{src}: cannot open: {e}") from None
        found: list[str] = []
        for p in sorted(paths):
            if fs.isdir(p):
                found += sorted(f for f in fs.find(p) if _format(f) is not None)
            elif fs.exists(p):
                found.append(p)
        if not found:
            raise SourceError(f"{src}: no files match")
        for p in found:
            fmt = _format(p)
            if fmt is None:
                raise SourceError(
                    f"{p}: unknown format (expected a name ending in {', '.join(FORMATS)})"
                )
            size = int(fs.size(p) or 0)
            out.append(SourceFile(url=fs.unstrip_protocol(p), name=p, size=size, fmt=fmt))
    return out


class _Counting(io.RawIOBase):
    """A read-only wrapper that counts the bytes read from the file under it."""

    def __init__(self, f: BinaryIO, counter: list[int]) -> None:
        self._f = f
        self._counter = counter

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self._counter[0] += n
        return n


def read_records(
    files: list[SourceFile],
    field: str = "text",
    start: tuple[int, int] = (0, 0),
    counter: list[int] | None = None,
) -> Iterator[Record | BadRecord]:
    """Every record of ``files`` in order, from ``start`` = (file index, records to skip in it).

    ``counter[0]`` grows by the bytes read from storage (for progress)."""
    import fsspec

    counter = counter if counter is not None else [0]
    first_file, skip = start
    for i in range(first_file, len(files)):
        sf = files[i]
        to_skip = skip if i == first_file else 0
        try:
            with fsspec.open(sf.url, mode="rb") as raw:
                if sf.fmt == ".parquet":  # needs seeks: read the file object itself
                    yield from _parquet_records(i, sf, raw, field, to_skip, counter)
                else:
                    yield from _file_records(i, sf, _Counting(raw, counter), field, to_skip)
        except Exception as e:
            # A file that cannot be opened, or breaks while being read (truncated gzip, ...).
            if not isinstance(e, (OSError, EOFError, ValueError)) and not type(
                e
            ).__module__.startswith(("zstandard", "pyarrow")):
                raise
            yield BadRecord(i, 0, f"{sf.name}:0", f"cannot read: {_short(e)}", ends_file=True)


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _file_records(
    i: int, sf: SourceFile, raw: io.RawIOBase, field: str, skip: int
) -> Iterator[Record | BadRecord]:
    f = io.BufferedReader(raw, 1 << 20)
    if sf.fmt == ".txt":
        yield from _txt_records(i, sf, f, skip)
    else:
        stream: BinaryIO = f  # type: ignore[assignment]
        if sf.fmt == ".jsonl.gz":
            import gzip

            stream = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
        elif sf.fmt == ".jsonl.zst":
            stream = io.BufferedReader(_Zstd(f), 1 << 20)  # type: ignore[assignment]
        yield from _jsonl_records(i, sf, stream, field, skip)


class _Zstd(io.RawIOBase):
    """Zstandard frames decompressed one after another; EOFError when the file ends inside a
    frame (a truncated file), which zstandard's own stream reader passes over in silence."""

    def __init__(self, f: BinaryIO) -> None:
        import zstandard

        self._f = f
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._d = self._new()
        self._out = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._out:
            data = self._f.read(1 << 20)
            if not data:
                if self._started and not self._d.eof:
                    raise EOFError("the zstd stream ends inside a frame (truncated file?)")
                return 0
            while data:
                if self._d.eof:
                    self._d = self._new()
                self._started = True
                self._out += self._d.decompress(data)
                data = self._d.unused_data if self._d.eof else b""
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _jsonl_records(
    i: int, sf: SourceFile, f: BinaryIO, field: str, skip: int
) -> Iterator[Record | BadRecord]:
    for n, line in enumerate(f, start=1):
        if n <= skip or not line.strip():
            continue
        where = f"{sf.name}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRecord(i, n, where, "bytes that are not UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield BadRecord(i, n, where, f"invalid JSON ({e.msg})")
            continue
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            yield BadRecord(i, n, where, f"no string field {field!r}")
            continue
        yield Record(i, n, value, True)


def _txt_records(i: int, sf: SourceFile, f: BinaryIO, skip: int) -> Iterator[Record | BadRecord]:
    """A .txt file as one document in line-aligned pieces (records 1, 2, ...)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    piece = 0
    while True:
        chunk = f.read(TXT_PIECE_BYTES)
        scanned = max(0, len(pending) - 1)
        try:
            pending += dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            where = f"{sf.name}:{piece + 1}"
            yield BadRecord(
                i, piece + 1, where, f"bytes that are not UTF-8 ({e.reason})", ends_file=True
            )
            return
        if not chunk:
            break
        cut = _piece_cut(pending, scanned)
        if cut <= 0:
            if len(pending) < TXT_MAX_PIECES * TXT_PIECE_BYTES:
                continue
            cut = len(pending)
        piece += 1
        if piece > skip:
            yield Record(i, piece, pending[:cut], False)
        pending = pending[cut:]
    piece += 1
    if piece > skip:
        yield Record(i, piece, pending, True)


def _piece_cut(text: str, lo: int = 0) -> int:
    """Where to cut ``text`` (see :data:`TXT_PIECE_BYTES`), searching at and after ``lo``; 0
    when there is no place."""
    end = len(text) - 1
    pos = end
    while pos > lo:  # before a space followed by a letter
        sp = text.rfind(" ", lo, pos)
        if sp <= 0:
            break
        if text[sp + 1].isalpha():
            return sp
        pos = sp
    pos = end
    while pos > lo:  # after a line break followed by a non-space character
        nl = text.rfind("\n", lo, pos)
        if nl < 0:
            break
        if not text[nl + 1].isspace():
            return nl + 1
        pos = nl
    return 0


def _parquet_records(
    i: int, sf: SourceFile, f: BinaryIO, field: str, skip: int, counter: list[int]
) -> Iterator[Record | BadRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    total_rows = max(1, pf.metadata.num_rows)
    if field not in pf.schema_arrow.names:
        yield BadRecord(
            i,
            0,
            f"{sf.name}:0",
            f"no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})",
        )
        return
    row = 0
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if row + rows <= skip:
            row += rows
            counter[0] += sf.size * rows // total_rows
            continue
        values = pf.read_row_group(g, columns=[field]).column(0).to_pylist()
        counter[0] += sf.size * rows // total_rows  # progress: this group's share of the file
        for value in values:
            row += 1
            if row <= skip:
                continue
            if isinstance(value, str):
                yield Record(i, row, value, True)
            else:
                yield BadRecord(i, row, f"{sf.name}:{row}", f"{field!r} is not a string")
        del values


def source_fingerprint(files: list[SourceFile]) -> list[dict[str, Any]]:
    """What identifies the sources for caching and resuming: URL, size and (local) mtime."""
    out: list[dict[str, Any]] = []
    for sf in files:
        entry: dict[str, Any] = {"url": sf.url, "bytes": sf.size}
        if sf.url.startswith("file://"):
            entry["mtime_ns"] = os.stat(sf.url[len("file://") :]).st_mtime_ns
        out.append(entry)
    return out
