"""Tokenizers that need no download: raw bytes, or a byte-level BPE trained locally.

The BPE is trained with Hugging Face ``tokenizers`` on the run's training text and saved as
JSON in the run directory; silos receive that file (and its hash) instead of training their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "eod_id",
    "load_tokenizer",
    "train_bpe",
]


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, path: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); lossless on any text.

    With ``eod=True`` id 256 is an end-of-document token (vocab 257), as ``fedtrain data
    prepare --byte`` writes it; it decodes to nothing."""

    name = "byte"

    def __init__(self, eod: bool = False) -> None:
        self.eod = eod
        self.vocab_size = 257 if eod else 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        path.write_text('{"type": "byte", "eod": 256}\n' if self.eod else '{"type": "byte"}\n')


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) backed by ``tokenizers``."""

    name = "bpe"

    def __init__(self, tok: object) -> None:
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size()  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # type: ignore[attr-defined,no-any-return]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without the tokenizer's special tokens (a BOS the template adds):
        pieces of one document are joined, and documents end with their end token."""
        encs = self._tok.encode_batch(texts, add_special_tokens=False)  # type: ignore[attr-defined]
        return [e.ids for e in encs]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)  # type: ignore[attr-defined,no-any-return]

    def save(self, path: Path) -> None:
        self._tok.save(str(path))  # type: ignore[attr-defined]


EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""Special tokens taken as the end-of-document token, in this order of preference."""


def eod_id(tok: Tokenizer) -> int | None:
    """The tokenizer's end-of-document token id, or None when it has none."""
    if isinstance(tok, ByteTokenizer):
        return 256 if tok.eod else None
    inner = getattr(tok, "_tok", None)
    if inner is None:
        return None
    for name in EOD_TOKENS:
        i = inner.token_to_id(name)
        if i is not None:
            return int(i)
    return None


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()
) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (a few seconds for a few MB); ``texts`` may be any
    iterator (the trainer keeps word counts, not the text)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read tokenizer {path}: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a tokenizer.json (not UTF-8 text)") from None
    if '"type": "byte"' in text[:40]:
        return ByteTokenizer(eod='"eod"' in text[:60])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # tokenizers raises its own Exception type
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
