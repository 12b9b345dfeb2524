"""Sections ``[run]``, ``[model]``, ``[data]``, ``[train]``: what is trained, on what, how long."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtrain.config.errors import check as _check

__all__ = ["DataSection", "ModelSection", "RunSection", "TrainSection"]


@dataclass(kw_only=True, slots=True)
class RunSection:
    name: str = "fedtrain"
    """Human-readable run name (also part of the run id)."""
    seed: int = 0
    """Seed for model init, data sampling and the simulated network."""
    rounds: int = 0
    """Maximum number of coordinator commits (rounds); 0 = until ``token_budget`` is spent."""
    token_budget: int = 0
    """Stop when this many training tokens (all silos together) are processed; 0 = no budget."""
    eval_every_tokens: int = 0
    """Evaluate the global model each time this many tokens pass; 0 = once per DiLoCo round."""
    eval_batches: int = 16
    """Number of held-out windows (of ``train.seq_len`` tokens) in each evaluation."""
    tensorboard: bool = False
    """Also write the metrics.jsonl scalars as TensorBoard event files in ``tensorboard/``
    (needs the ``tensorboard`` package: ``pip install 'fedtrain[tensorboard]'``)."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 0, "run.rounds", "an integer >= 0", self.rounds)
        _check(self.token_budget >= 0, "run.token_budget", "an integer >= 0", self.token_budget)
        _check(
            self.rounds > 0 or self.token_budget > 0,
            "run.rounds",
            "> 0 when run.token_budget is 0 (the run needs an end)",
            self.rounds,
        )
        _check(
            self.eval_every_tokens >= 0,
            "run.eval_every_tokens",
            "an integer >= 0",
            self.eval_every_tokens,
        )
        _check(self.eval_batches >= 1, "run.eval_batches", "an integer >= 1", self.eval_batches)


@dataclass(kw_only=True, slots=True)
class ModelSection:
    preset: str = "tiny"
    """Model size preset: tiny (~1M), mini (~5M), small (~10M), 125m, 1b."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""

    def __post_init__(self) -> None:
        from fedtrain.models.presets import PRESETS

        _check(self.preset in PRESETS, "model.preset", f"one of {sorted(PRESETS)}", self.preset)


@dataclass(kw_only=True, slots=True)
class DataSection:
    corpus: str = "kjv"
    """Shared corpus: 'kjv' (King James Bible, ships with the package) or 'files' (data.files)."""
    files: list[str] = field(default_factory=list)
    """Text files or fsspec URLs (txt, or jsonl with a 'text' field) when corpus = 'files'."""
    silos: int = 4
    """Number of silos."""
    split: str = "noniid"
    """How documents are divided among silos: 'iid' (shuffled) or 'noniid' (contiguous)."""
    eval_fraction: float = 0.05
    """Fraction of documents held out for evaluation (never trained on)."""
    tokenizer: str = "byte"
    """'byte' (vocab 256) or 'bpe' (byte-level BPE trained locally on the training split)."""
    vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer."""
    max_chars: int = 0
    """Use only the first N characters of the corpus (0 = all); handy for quick tests."""
    silo_data: dict[str, str] = field(default_factory=dict)
    """Silo name -> its own data, replacing its corpus shard: a directory made by `fedtrain data
    prepare`, or raw sources (path, glob, directory or fsspec URL; txt, jsonl, jsonl.gz,
    jsonl.zst, parquet) prepared once into the data cache."""
    tokenizer_file: str = ""
    """A Hugging Face tokenizer.json to use as the run's tokenizer (overrides data.tokenizer);
    by default the tokenizer of the prepared directories in data.silo_data, if any."""
    order: str = "random"
    """Training batches: 'random' windows (seeded per silo and step) or 'sequential'
    (non-overlapping windows in order: each token once per epoch; epochs reported)."""

    def __post_init__(self) -> None:
        _check(self.corpus in ("kjv", "files"), "data.corpus", "'kjv' or 'files'", self.corpus)
        _check(
            self.corpus != "files" or bool(self.files),
            "data.files",
            "a non-empty list when data.corpus = 'files'",
            self.files,
        )
        _check(1 <= self.silos <= 4096, "data.silos", "an integer in [1, 4096]", self.silos)
        _check(self.split in ("iid", "noniid"), "data.split", "'iid' or 'noniid'", self.split)
        _check(
            0.0 < self.eval_fraction < 0.5,
            "data.eval_fraction",
            "a number in (0, 0.5)",
            self.eval_fraction,
        )
        _check(
            self.tokenizer in ("byte", "bpe"), "data.tokenizer", "'byte' or 'bpe'", self.tokenizer
        )
        _check(
            300 <= self.vocab_size <= 65536,
            "data.vocab_size",
            "an integer in [300, 65536]",
            self.vocab_size,
        )
        _check(self.max_chars >= 0, "data.max_chars", "an integer >= 0", self.max_chars)
        _check(
            self.order in ("random", "sequential"),
            "data.order",
            "'random' or 'sequential'",
            self.order,
        )


@dataclass(kw_only=True, slots=True)
class TrainSection:
    inner_steps: int = 50
    """H: inner optimizer steps each silo runs between outer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 128
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches accumulated into one inner step."""
    lr: float = 1e-3
    """Peak inner AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the whole-run cosine schedule, as a fraction of the peak."""
    warmup_steps: int = 20
    """Linear warm-up of the inner learning rate, in inner steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (Muon's too, with train.optimizer = "muon")."""
    optimizer: str = "adamw"
    """Inner optimizer: adamw, or muon (Muon on the hidden weight matrices, AdamW on
    embeddings, norms and the head: MuLoCo)."""
    grad_clip: float = 1.0
    """Clip each inner step's gradient to this global norm (0 = off)."""
    bf16: bool = False
    """Run forward/backward under bf16 autocast (master weights stay fp32)."""
    threads: int = 0
    """torch intra-op threads for training (0 = all cores)."""

    def __post_init__(self) -> None:
        _check(self.inner_steps >= 1, "train.inner_steps", "an integer >= 1", self.inner_steps)
        _check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _check(
            8 <= self.seq_len <= 65536, "train.seq_len", "an integer in [8, 65536]", self.seq_len
        )
        _check(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1", self.grad_accum)
        _check(0.0 < self.lr < 1.0, "train.lr", "a number in (0, 1)", self.lr)
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "train.min_lr_ratio",
            "a number in [0, 1]",
            self.min_lr_ratio,
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(self.weight_decay >= 0.0, "train.weight_decay", "a number >= 0", self.weight_decay)
        _check(
            self.optimizer in ("adamw", "muon"),
            "train.optimizer",
            "one of ['adamw', 'muon']",
            self.optimizer,
        )
        _check(self.grad_clip >= 0.0, "train.grad_clip", "a number >= 0", self.grad_clip)
        _check(self.threads >= 0, "train.threads", "an integer >= 0", self.threads)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one silo processes per inner step."""
        return self.batch_size * self.seq_len * self.grad_accum
