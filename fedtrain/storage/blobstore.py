"""Content-addressed, immutable blobs on any fsspec filesystem.

A blob's id is the sha256 of its bytes; it lives at ``<root>/<id[:2]>/<id>``. Writes go to a
temporary name and are renamed into place (an atomic rename on local disks; on object stores
each put is already atomic), so a crash never leaves a partial blob under a real id. Every
read re-hashes the bytes: a corrupted blob raises :class:`BlobCorrupted` and is never used.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
from fsspec.core import url_to_fs

__all__ = ["BlobCorrupted", "BlobMissing", "BlobStore"]

_CHUNK = 16 << 20
"""Bytes written or hashed at a time."""


class BlobCorrupted(RuntimeError):
    """A blob's bytes no longer hash to its id."""


class BlobMissing(KeyError):
    """No blob with that id exists."""


class BlobStore:
    """Immutable sha256-addressed blobs under ``url`` (file://, memory://, s3://, ...)."""

    def __init__(
        self,
        url: str,
        fs: fsspec.AbstractFileSystem | None = None,
        on_tmp_written: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        if fs is None:
            try:
                fs, root = url_to_fs(url, **options)
            except ImportError as e:  # e.g. s3:// without s3fs: fsspec names the package
                raise ValueError(f"storage.url {url!r} cannot be opened: {e}") from None
        else:
            root = url.split("://", 1)[-1]
        self.fs = fs
        self.url = url
        self.root = root.rstrip("/")
        self.on_tmp_written = on_tmp_written
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)

    def path(self, blob_id: str) -> str:
        return f"{self.root}/{blob_id[:2]}/{blob_id}"

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` (idempotent; repairs a corrupted copy); return its id."""
        return self.put_chunks([data])

    def put_chunks(self, chunks: Iterable[bytes | bytearray | memoryview]) -> str:
        """Store the concatenation of ``chunks``, written and hashed as they come (never held
        whole: a tensor file streams from the tensors' own memory); return its id."""
        tmp = f"{self.root}/tmp/{uuid.uuid4().hex}.{os.getpid()}"
        sha = hashlib.sha256()
        with self.fs.open(tmp, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                for i in range(0, len(view), _CHUNK):
                    part = view[i : i + _CHUNK]
                    sha.update(part)
                    f.write(part)
        blob_id = sha.hexdigest()
        final = self.path(blob_id)
        # Deduplicate only onto an intact copy: a corrupted one is replaced, not trusted.
        if self.fs.exists(final) and self._intact(blob_id):
            self.fs.rm(tmp)
            return blob_id
        if self.on_tmp_written is not None:
            self.on_tmp_written()
        self.fs.makedirs(f"{self.root}/{blob_id[:2]}", exist_ok=True)
        self.fs.mv(tmp, final)
        return blob_id

    def _intact(self, blob_id: str) -> bool:
        """Whether the stored blob still hashes to its id (read a chunk at a time)."""
        sha = hashlib.sha256()
        try:
            with self.fs.open(self.path(blob_id), "rb") as f:
                while chunk := f.read(_CHUNK):
                    sha.update(chunk)
        except FileNotFoundError:
            return False
        return sha.hexdigest() == blob_id

    def get(self, blob_id: str) -> bytes:
        """The blob's bytes, verified against its id."""
        try:
            with self.fs.open(self.path(blob_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlobMissing(blob_id) from None
        if hashlib.sha256(data).hexdigest() != blob_id:
            raise BlobCorrupted(f"blob {blob_id[:16]}… is corrupted (checksum mismatch)")
        return bytes(data)

    def size(self, blob_id: str) -> int:
        """Bytes of a stored blob (without reading it)."""
        return int(self.fs.size(self.path(blob_id)))

    def exists(self, blob_id: str) -> bool:
        return bool(self.fs.exists(self.path(blob_id)))

    def delete(self, blob_id: str) -> None:
        if self.exists(blob_id):
            self.fs.rm(self.path(blob_id))
