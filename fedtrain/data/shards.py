"""Prepared token directories: shards of uint16/uint32 tokens read through ``np.memmap``.

A prepared directory holds ``index.json`` (see :func:`index_document`), ``tokenizer.json``,
training shards ``train-NNNNN.bin`` and eval shards ``eval-NNNNN.bin`` (whole held-out
documents), and ``counts.npy`` (unigram counts of the training tokens). Opening one checks every
shard's size and sha256 against the index before anything trains, and names the shard that is
missing, truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "INDEX", "ShardError", "ShardedTokens", "TokenShards", "is_prepared"]

FORMAT = "fedtrain-tokens/1"
INDEX = "index.json"


class ShardError(ValueError):
    """A prepared directory is unusable; the message names the file and what is wrong."""


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a local directory with a prepared-token index."""
    p = Path(path)
    return p.is_dir() and (p / INDEX).is_file()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardedTokens:
    """One token sequence made of memory-mapped shards; nothing is read until asked for.

    ``windows(starts, length)`` gathers rows ``tokens[s : s + length]`` as int64, also across
    shard boundaries; only the pages of those windows are touched.
    """

    def __init__(self, files: list[Path], dtype: str, start: int = 0, stop: int | None = None):
        self._maps = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size > 0]
        sizes = [len(m) for m in self._maps]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        total = int(self._offsets[-1])
        self.start = start
        self.stop = total if stop is None else min(stop, total)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def numel(self) -> int:
        return len(self)

    def view(self, start: int, stop: int) -> ShardedTokens:
        """Tokens ``[start, stop)`` of this sequence, sharing its maps."""
        out = object.__new__(ShardedTokens)
        out._maps, out._offsets = self._maps, self._offsets
        out.start = self.start + max(0, start)
        out.stop = min(self.stop, self.start + stop)
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as an int64 array (a copy)."""
        a, b = self.start + start, self.start + min(stop, len(self))
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        out = np.empty(b - a, dtype=np.int64)
        k = int(np.searchsorted(self._offsets, a, side="right")) - 1
        pos = a
        while pos < b:
            lo = pos - int(self._offsets[k])
            take = min(b - pos, len(self._maps[k]) - lo)
            out[pos - a : pos - a + take] = self._maps[k][lo : lo + take]
            pos += take
            k += 1
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``(len(starts), length)`` int64 rows ``tokens[s : s + length]``."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for r, s in enumerate(starts.tolist()):
            out[r] = self.read(int(s), int(s) + length)
        return out

    def chunks(self, size: int = 1 << 24) -> Iterator[np.ndarray]:
        """The whole sequence in int64 chunks of at most ``size`` tokens (bounded memory)."""
        for a in range(0, len(self), size):
            yield self.read(a, min(a + size, len(self)))


@dataclass(frozen=True, slots=True)
class TokenShards:
    """An opened, verified prepared directory."""

    root: Path
    index: dict[str, Any]
    train: ShardedTokens
    eval: ShardedTokens

    @property
    def tokenizer_path(self) -> Path:
        return self.root / str(self.index["tokenizer"]["file"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.index["tokenizer"]["sha256"])

    def unigram_counts(self, vocab: int) -> np.ndarray:
        """Counts of each token id in the training shards (from ``counts.npy``)."""
        counts = np.load(self.root / "counts.npy")
        out = np.zeros(max(vocab, len(counts)), dtype=np.int64)
        out[: len(counts)] = counts
        return out[:vocab]

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> TokenShards:
        """Open ``root``; ShardError (naming the file) when the index or any shard is wrong."""
        root = Path(root)
        index = _read_index(root)
        seen = _verified(root) if verify else None
        stamps: dict[str, list[int]] = {}
        for entry in [*index["shards"], *index["eval"]["shards"]]:
            stamps[entry["file"]] = _check_shard(root, entry, index["dtype"], seen)
        tok = index["tokenizer"]
        tok_path = root / str(tok["file"])
        if not tok_path.is_file():
            raise ShardError(f"{tok_path}: the tokenizer file is missing")
        if verify and file_sha256(tok_path) != tok["sha256"]:
            raise ShardError(f"{tok_path}: sha256 does not match {root / INDEX}")
        if seen is not None and stamps != seen:
            _save_verified(root, stamps)
        dtype = str(index["dtype"])
        return cls(
            root=root,
            index=index,
            train=ShardedTokens([root / e["file"] for e in index["shards"]], dtype),
            eval=ShardedTokens([root / e["file"] for e in index["eval"]["shards"]], dtype),
        )


def _read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{root}: not a prepared directory (no {INDEX})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: cannot read: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} index")
    return index


VERIFIED = "verified.json"
"""Size and mtime of each shard when its sha256 last matched: a shard whose file has not
changed since is not hashed again (a 1 TB corpus is not re-read at every start)."""


def _verified(root: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((root / VERIFIED).read_text())
        return {str(k): [int(v[0]), int(v[1])] for k, v in data.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return {}


def _save_verified(root: Path, stamps: dict[str, list[int]]) -> None:
    try:
        tmp = root / f".{VERIFIED}.tmp"
        tmp.write_text(json.dumps(stamps))
        tmp.replace(root / VERIFIED)
    except OSError:
        pass  # a read-only dataset directory: shards are hashed at every open


def _check_shard(
    root: Path, entry: dict[str, Any], dtype: str, seen: dict[str, list[int]] | None
) -> list[int]:
    """Check one shard's size (and sha256 unless ``seen`` has its unchanged stamp; never when
    ``seen`` is None); its (size, mtime) stamp."""
    path = root / str(entry["file"])
    want = int(entry["tokens"]) * np.dtype(dtype).itemsize
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing (listed in {root / INDEX})") from None
    if st.st_size != want:
        raise ShardError(
            f"shard {path} is truncated or corrupted: {st.st_size} bytes, the index says {want}"
        )
    stamp = [st.st_size, st.st_mtime_ns]
    if seen is not None and seen.get(entry["file"]) != stamp:
        if file_sha256(path) != entry["sha256"]:
            raise ShardError(f"shard {path} is corrupted: its sha256 does not match {root / INDEX}")
    return stamp
