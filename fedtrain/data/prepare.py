"""Turn a config's data section into tokenised per-silo streams and an eval set."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtrain.config import Config
from fedtrain.data.corpus import Document, kjv_documents, read_text_documents
from fedtrain.data.partition import partition_documents
from fedtrain.data.stream import eval_windows, unigram_cross_entropy
from fedtrain.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    file_sha256,
    load_tokenizer,
    train_bpe,
)

__all__ = ["PreparedData", "prepare_data", "tokenize_documents"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedData:
    tokenizer: Tokenizer
    """The run's tokenizer."""
    tokenizer_path: Path
    """Where it is saved (shipped to silos with its hash)."""
    tokenizer_sha256: str
    """Hash of the tokenizer file (part of the run manifest)."""
    silo_tokens: list[torch.Tensor]
    """Training tokens of each silo, in silo order."""
    silo_groups: list[list[str]]
    """Document groups (books / files) each silo holds, for reports."""
    eval_batch: torch.Tensor
    """Fixed held-out windows ``(run.eval_batches, seq_len + 1)``."""
    unigram_eval_loss: float
    """Cross-entropy of a unigram model of the training tokens on the eval windows."""


def tokenize_documents(tok: Tokenizer, docs: list[Document]) -> torch.Tensor:
    """Concatenated token ids of ``docs`` (int32)."""
    texts = [d.text for d in docs]
    if isinstance(tok, BPETokenizer):
        ids = [i for seq in tok.encode_batch(texts) for i in seq]
    else:
        ids = list("".join(texts).encode("utf-8"))
    return torch.tensor(ids, dtype=torch.int32)


def _corpus(cfg: Config) -> list[Document]:
    docs = kjv_documents() if cfg.data.corpus == "kjv" else read_text_documents(cfg.data.files)
    if cfg.data.max_chars:
        kept, total = [], 0
        for d in docs:
            if total >= cfg.data.max_chars:
                break
            kept.append(d)
            total += len(d.text)
        docs = kept
    return docs


def prepare_data(cfg: Config, out_dir: Path) -> PreparedData:
    """Read, partition and tokenise the corpus; save the tokenizer to ``out_dir``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    docs = _corpus(cfg)
    part = partition_documents(
        docs, cfg.data.silos, cfg.data.split, cfg.data.eval_fraction, cfg.run.seed
    )
    names = cfg.silo_names()
    silo_docs = [
        read_text_documents([cfg.data.silo_data[n]]) if n in cfg.data.silo_data else ds
        for n, ds in zip(names, part.silo_docs, strict=True)
    ]
    tok_path = out_dir / "tokenizer.json"
    tok: Tokenizer
    if tok_path.exists():
        tok = load_tokenizer(tok_path)  # a resumed run keeps the tokenizer it started with
    elif cfg.data.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        train_text = [d.text for ds in silo_docs for d in ds]
        log.info("training a %d-token BPE on %d documents", cfg.data.vocab_size, len(train_text))
        tok = train_bpe(train_text, cfg.data.vocab_size)
    if not tok_path.exists():
        tok.save(tok_path)
    silo_tokens = [tokenize_documents(tok, ds) for ds in silo_docs]
    for name, t in zip(names, silo_tokens, strict=True):
        if t.numel() < cfg.train.seq_len + 2:
            raise ValueError(
                f"silo {name} has only {t.numel()} tokens; needs more text than "
                f"one sequence of train.seq_len = {cfg.train.seq_len}"
            )
    eval_tokens = tokenize_documents(tok, part.eval_docs)
    batch = eval_windows(eval_tokens, cfg.run.eval_batches, cfg.train.seq_len)
    unigram = unigram_cross_entropy(torch.cat(silo_tokens), batch[:, 1:], tok.vocab_size)
    groups = [sorted({d.group for d in ds}) for ds in silo_docs]
    return PreparedData(
        tokenizer=tok,
        tokenizer_path=tok_path,
        tokenizer_sha256=file_sha256(tok_path),
        silo_tokens=silo_tokens,
        silo_groups=groups,
        eval_batch=batch,
        unigram_eval_loss=unigram,
    )


@dataclass(slots=True)
class SiloData:
    """What a deployed silo trains and evaluates on."""

    tokens: torch.Tensor
    """Training tokens (int32)."""
    heldout: torch.Tensor
    """Held-out windows ``(N, seq_len + 1)`` the silo reports its own loss on."""
    source: str
    """Where the text came from (for logs)."""


def silo_data(cfg: Config, silo: str, tok: Tokenizer, data: str | None = None) -> SiloData:
    """A deployed silo's data: ``data`` (its own text: path, glob or fsspec URL), else the
    config's ``[data.silo_data]`` entry, else its share of the public corpus — the same tokens the
    in-process simulation gives that silo.

    Held out: the last 5% of the silo's own text, or the public eval split when the silo
    trains on the public corpus (its own share is all training data there).
    """
    names = cfg.silo_names()
    if silo not in names:
        raise ValueError(f"silo {silo!r} is not in this run (silos: {', '.join(names)})")
    url = data or cfg.data.silo_data.get(silo)
    seq = cfg.train.seq_len
    if url is not None:
        tokens = tokenize_documents(tok, read_text_documents([url]))
        cut = tokens.numel() - max(tokens.numel() // 20, seq + 1)
        if cut < seq + 2:
            raise ValueError(f"silo {silo}: {url} holds only {tokens.numel()} tokens")
        heldout = eval_windows(tokens[cut:], max(1, cfg.run.eval_batches // 4), seq)
        return SiloData(tokens=tokens[:cut], heldout=heldout, source=url)
    part = partition_documents(
        _corpus(cfg), cfg.data.silos, cfg.data.split, cfg.data.eval_fraction, cfg.run.seed
    )
    tokens = tokenize_documents(tok, part.silo_docs[names.index(silo)])
    eval_tokens = tokenize_documents(tok, part.eval_docs)
    heldout = eval_windows(eval_tokens, max(1, cfg.run.eval_batches // 4), seq)
    return SiloData(tokens=tokens, heldout=heldout, source=f"public corpus ({cfg.data.corpus})")
