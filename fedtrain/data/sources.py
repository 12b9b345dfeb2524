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
"""A .txt file is read in pieces of about this many bytes, cut where a line starts with a
non-space character (byte-level BPE pre-tokenisation cannot join across such a cut)."""


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
        except (OSError, EOFError, ValueError) as e:
            # A file that cannot be opened, or breaks while being read (truncated gzip, ...).
            yield BadRecord(i, 0, f"{sf.name}:0", f"cannot read: {_short(e)}")
        except Exception as e:
            if type(e).__module__.startswith(("zstandard", "pyarrow")):
                yield BadRecord(i, 0, f"{sf.name}:0", f"cannot read: {_short(e)}")
            else:
                raise


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
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(f)  # type: ignore[assignment]
            stream = io.BufferedReader(stream, 1 << 20)  # type: ignore[arg-type,assignment]
        yield from _jsonl_records(i, sf, stream, field, skip)


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
        try:
            pending += dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            yield BadRecord(
                i, piece + 1, f"{sf.name}:{piece + 1}", f"bytes that are not UTF-8 ({e.reason})"
            )
            return
        if not chunk:
            break
        cut = _line_cut(pending)
        if cut <= 0:
            continue
        piece += 1
        if piece > skip:
            yield Record(i, piece, pending[:cut], False)
        pending = pending[cut:]
    piece += 1
    if piece > skip:
        yield Record(i, piece, pending, True)


def _line_cut(text: str) -> int:
    """The last position after a newline that is followed by a non-space character (0: none)."""
    pos = len(text) - 1
    while True:
        nl = text.rfind("\n", 0, pos)
        if nl < 0:
            return 0
        nxt = text[nl + 1] if nl + 1 < len(text) else ""
        if nxt and not nxt.isspace():
            return nl + 1
        pos = nl


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
