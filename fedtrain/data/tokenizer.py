"""Tokenizers that need no download: raw bytes, or a byte-level BPE trained locally.

The BPE is trained with Hugging Face ``tokenizers`` on the run's training text and saved as
JSON in the run directory; silos receive that file (and its hash) instead of training their own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

__all__ = ["BPETokenizer", "ByteTokenizer", "Tokenizer", "load_tokenizer", "train_bpe"]


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, path: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); lossless on any text."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        path.write_text('{"type": "byte"}\n')


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) backed by ``tokenizers``."""

    name = "bpe"

    def __init__(self, tok: object) -> None:
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size()  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # type: ignore[attr-defined,no-any-return]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)  # type: ignore[attr-defined,no-any-return]

    def save(self, path: Path) -> None:
        self._tok.save(str(path))  # type: ignore[attr-defined]


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (a few seconds for a few MB)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save`."""
    text = path.read_text()
    if '"type": "byte"' in text[:40]:
        return ByteTokenizer()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (tokenizer identity in the run manifest)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
