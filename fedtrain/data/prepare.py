"""Turn a config's data section into per-silo token shards (memory-mapped) and an eval set."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtrain.config import Config
from fedtrain.data.corpus import Document, kjv_documents, read_text_documents
from fedtrain.data.partition import partition_documents
from fedtrain.data.prepared import (
    DEFAULT_BPE_SAMPLE_BYTES,
    open_documents,
    open_tokens,
    sample_texts,
)
from fedtrain.data.shards import ShardedTokens, TokenShards, file_sha256, is_prepared
from fedtrain.data.sources import expand_sources
from fedtrain.data.stream import eval_windows, unigram_cross_entropy
from fedtrain.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "PreparedData",
    "SiloData",
    "configured_tokenizer",
    "eval_split",
    "prepare_data",
    "silo_data",
    "tokenize_documents",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PreparedData:
    tokenizer: Tokenizer
    """The run's tokenizer."""
    tokenizer_path: Path
    """Where it is saved (shipped to silos with its hash)."""
    tokenizer_sha256: str
    """Hash of the tokenizer file (part of the run manifest)."""
    silo_tokens: list[ShardedTokens]
    """Training tokens of each silo (memory-mapped shards), in silo order."""
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


def _public_shards(cfg: Config, part_docs: list[Document], tok_path: Path) -> TokenShards:
    """A silo's share of the shared corpus, prepared into shards like any other text."""
    return open_documents([d.text for d in part_docs], tok_path)


def _run_tokenizer(cfg: Config, out_dir: Path, silo_docs: list[list[Document] | None]) -> Path:
    """The run's tokenizer file in ``out_dir``: kept on resume; else ``data.tokenizer_file``,
    else the tokenizer of the prepared directories in ``[data.silo_data]``, else bytes or a BPE
    trained on the training text (a bounded sample of each silo's own sources)."""
    tok_path = out_dir / "tokenizer.json"
    if tok_path.exists():
        return tok_path  # a resumed run keeps the tokenizer it started with
    given = configured_tokenizer(cfg)
    tok: Tokenizer
    if given is not None:
        load_tokenizer(given)  # a clear error when it is not one
        shutil.copyfile(given, tok_path)
        return tok_path
    if cfg.data.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        names = cfg.silo_names()
        budget = DEFAULT_BPE_SAMPLE_BYTES // max(1, len(cfg.data.silo_data))

        def texts() -> Iterator[str]:
            for name, docs in zip(names, silo_docs, strict=True):
                if docs is None:
                    files = expand_sources([cfg.data.silo_data[name]])
                    yield from sample_texts(files, "text", budget)
                else:
                    yield from (d.text for d in docs)

        log.info("training a %d-token BPE on the training text", cfg.data.vocab_size)
        tok = train_bpe(texts(), cfg.data.vocab_size)
    tok.save(tok_path)
    return tok_path


def configured_tokenizer(cfg: Config) -> Path | None:
    """The tokenizer file the config names (``data.tokenizer_file``) or implies (that of the
    prepared directories in ``[data.silo_data]``); None when the run makes its own."""
    if cfg.data.tokenizer_file:
        return Path(cfg.data.tokenizer_file)
    prepared = {n: u for n, u in sorted(cfg.data.silo_data.items()) if is_prepared(u)}
    shas = {n: TokenShards.open(u, verify=False) for n, u in prepared.items()}
    if len({s.tokenizer_sha256 for s in shas.values()}) > 1:
        listed = ", ".join(f"{n} ({s.tokenizer_sha256[:12]})" for n, s in shas.items())
        raise ValueError(
            f"data.silo_data: the prepared directories use different tokenizers: {listed}; "
            "prepare them all with one --tokenizer"
        )
    return next((s.tokenizer_path for s in shas.values()), None)


def prepare_data(cfg: Config, out_dir: Path) -> PreparedData:
    """Partition the shared corpus, settle the run's tokenizer (saved in ``out_dir``) and open
    every silo's training tokens as memory-mapped shards (prepared on first use)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    docs = _corpus(cfg)
    part = partition_documents(
        docs, cfg.data.silos, cfg.data.split, cfg.data.eval_fraction, cfg.run.seed
    )
    names = cfg.silo_names()
    own: list[list[Document] | None] = [
        None if n in cfg.data.silo_data else ds for n, ds in zip(names, part.silo_docs, strict=True)
    ]
    for url in cfg.data.silo_data.values():
        if not is_prepared(url):
            expand_sources([url])  # names a source that matches nothing, before any work
    tok_path = _run_tokenizer(cfg, out_dir, own)
    tok = load_tokenizer(tok_path)
    silo_tokens: list[TokenShards] = []
    for name, ds in zip(names, own, strict=True):
        shards = (
            open_tokens(cfg.data.silo_data[name], tok_path, progress=True)
            if ds is None
            else _public_shards(cfg, ds, tok_path)
        )
        if len(shards.train) < cfg.train.seq_len + 2:
            raise ValueError(
                f"silo {name} has only {len(shards.train)} tokens; needs more text than "
                f"one sequence of train.seq_len = {cfg.train.seq_len}"
            )
        silo_tokens.append(shards)
    eval_tokens = tokenize_documents(tok, part.eval_docs)
    batch = eval_windows(eval_tokens, cfg.run.eval_batches, cfg.train.seq_len)
    counts = sum(s.unigram_counts(tok.vocab_size) for s in silo_tokens)
    groups = [
        sorted({d.group for d in ds}) if ds is not None else [Path(cfg.data.silo_data[n]).name]
        for n, ds in zip(names, own, strict=True)
    ]
    return PreparedData(
        tokenizer=tok,
        tokenizer_path=tok_path,
        tokenizer_sha256=file_sha256(tok_path),
        silo_tokens=[s.train for s in silo_tokens],
        silo_groups=groups,
        eval_batch=batch,
        unigram_eval_loss=unigram_cross_entropy(torch.from_numpy(counts), batch[:, 1:]),
    )


def eval_split(cfg: Config, tok: Tokenizer, count: int | None = None) -> torch.Tensor:
    """The run's held-out windows (those :func:`prepare_data` gives, for ``count`` =
    ``run.eval_batches``), without opening any silo's data."""
    part = partition_documents(
        _corpus(cfg), cfg.data.silos, cfg.data.split, cfg.data.eval_fraction, cfg.run.seed
    )
    windows = count or cfg.run.eval_batches
    return eval_windows(tokenize_documents(tok, part.eval_docs), windows, cfg.train.seq_len)


@dataclass(slots=True)
class SiloData:
    """What a deployed silo trains and evaluates on."""

    tokens: ShardedTokens
    """Training tokens (memory-mapped)."""
    heldout: torch.Tensor
    """Held-out windows ``(N, seq_len + 1)`` the silo reports its own loss on."""
    source: str
    """Where the text came from (for logs)."""


def silo_data(cfg: Config, silo: str, tok_path: Path, data: str | None = None) -> SiloData:
    """A deployed silo's data: ``data`` (its own text: a prepared directory, or a path, glob or
    fsspec URL prepared on first use), else the config's ``[data.silo_data]`` entry, else its
    share of the public corpus — the same tokens the in-process simulation gives that silo.

    Held out: a prepared directory's eval split when it has one, else the last 5% of the
    silo's own tokens, or the public eval split when the silo trains on the public corpus.
    """
    names = cfg.silo_names()
    if silo not in names:
        raise ValueError(f"silo {silo!r} is not in this run (silos: {', '.join(names)})")
    url = data or cfg.data.silo_data.get(silo)
    seq = cfg.train.seq_len
    count = max(1, cfg.run.eval_batches // 4)
    if url is not None:
        shards = open_tokens(url, tok_path, progress=True)
        tokens = shards.train
        if len(shards.eval) >= seq + 1:
            return SiloData(tokens, eval_windows(shards.eval, count, seq), url)
        cut = len(tokens) - max(len(tokens) // 20, seq + 1)
        if cut < seq + 2:
            raise ValueError(f"silo {silo}: {url} holds only {len(tokens)} tokens")
        heldout = eval_windows(tokens.view(cut, len(tokens)), count, seq)
        return SiloData(tokens=tokens.view(0, cut), heldout=heldout, source=url)
    tok = load_tokenizer(tok_path)
    part = partition_documents(
        _corpus(cfg), cfg.data.silos, cfg.data.split, cfg.data.eval_fraction, cfg.run.seed
    )
    tokens = _public_shards(cfg, part.silo_docs[names.index(silo)], tok_path).train
    heldout = eval_windows(tokenize_documents(tok, part.eval_docs), count, seq)
    return SiloData(tokens=tokens, heldout=heldout, source=f"public corpus ({cfg.data.corpus})")
