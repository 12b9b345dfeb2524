"""Typed run configuration: dataclasses, TOML loading, ``--set`` overrides and validation.

Every field has a one-line docstring under it; ``__post_init__`` validates and names the key and
the allowed values in its message. Errors a user can cause raise :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "DataSection",
    "FaultsSection",
    "ModelSection",
    "ReliabilitySection",
    "RoundSection",
    "RunSection",
    "SiloProfile",
    "SimulationSection",
    "StorageSection",
    "StrategySection",
    "TrainSection",
    "TransportSection",
    "apply_overrides",
    "config_from_dict",
    "config_sha256",
    "config_to_dict",
    "load_config",
    "packaged_example",
]


class ConfigError(ValueError):
    """A config value or key a user wrote is not allowed; the message names it."""


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


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
    """Silo name -> its own text (path, glob or fsspec URL), replacing its corpus shard."""

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
    """AdamW weight decay."""
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
        _check(self.grad_clip >= 0.0, "train.grad_clip", "a number >= 0", self.grad_clip)
        _check(self.threads >= 0, "train.threads", "an integer >= 0", self.threads)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens one silo processes per inner step."""
        return self.batch_size * self.seq_len * self.grad_accum


STRATEGIES = ("diloco", "fedavg", "ddp", "streaming", "zo")


@dataclass(kw_only=True, slots=True)
class StrategySection:
    name: str = "diloco"
    """'diloco', 'fedavg' (outer SGD lr 1, no momentum), 'streaming' or 'ddp' (baseline)."""
    outer_lr: float = 0.7
    """Outer optimizer learning rate (DiLoCo; ignored by the fedavg preset)."""
    outer_momentum: float = 0.9
    """Outer optimizer momentum (DiLoCo; ignored by the fedavg preset)."""
    nesterov: bool = True
    """Use Nesterov momentum in the outer step."""
    weighting: str = "tokens"
    """Weight of each silo's pseudo-gradient: 'tokens' (tokens processed) or 'equal'."""
    fragments: int = 4
    """Streaming: P, the number of fragments (at most the number of layers; 1 = DiLoCo)."""
    fragment_pattern: str = "strided"
    """Streaming: 'strided' (fragment p holds blocks p, p+P, ...) or 'contiguous'."""
    delay_steps: int = 1
    """Streaming: τ, inner steps a fragment's outer result may arrive late (overlap); < H/P."""
    mix_alpha: float = 0.5
    """Streaming: α, the merge θ_p ← α·θ_local + (1−α)·θ_global (0 = take the global)."""
    zo_samples_per_round: int = 8
    """ZO: K, projected gradients (one byte each) per silo per round."""
    zo_eps: float = 1e-3
    """ZO: ε, the SPSA perturbation size."""
    zo_lr: float = 1e-3
    """ZO: η in θ ← θ − (η/N)·Σ ĝ·z."""
    zo_perturbation: str = "rademacher"
    """ZO: z distribution, 'rademacher' (device independent) or 'gaussian' (CPU generator)."""
    zo_trainable: str = ""
    """ZO: glob of parameter names to tune (e.g. 'tok_emb.*'); empty = all."""
    aggregator: str = "mean"
    """How a round's updates combine: 'mean' (weighted, streaming), 'median' (coordinate-wise),
    'trimmed_mean' (coordinate-wise, drops trim_fraction at each end) or 'clipped_mean' (each
    update's L2 norm clipped to clip_norm, then the weighted mean)."""
    trim_fraction: float = 0.1
    """trimmed_mean: β, the fraction of updates dropped at each end per coordinate (< 0.5)."""
    clip_norm: float = 1.0
    """clipped_mean: largest L2 norm an update keeps (over all its tensors)."""
    coding: str = "off"
    """Gradient-code DiLoCo rounds over public shards: 'off', 'auto', 'frc', 'cyclic', 'random'."""
    stragglers: int = 0
    """Gradient coding: s, the stragglers a coded round tolerates (each silo trains s+1 shards)."""
    scheduling: str = "sync"
    """'sync' (every silo runs H steps per round) or 'compass' (per-silo steps, arrival groups)."""
    q_min: int = 20
    """Compass: fewest inner steps a silo is given."""
    q_max: int = 100
    """Compass: most inner steps a silo is given (a new group's steps)."""

    def __post_init__(self) -> None:
        _check(self.fragments >= 1, "strategy.fragments", "an integer >= 1", self.fragments)
        _check(
            self.fragment_pattern in ("strided", "contiguous"),
            "strategy.fragment_pattern",
            "'strided' or 'contiguous'",
            self.fragment_pattern,
        )
        _check(self.delay_steps >= 0, "strategy.delay_steps", "an integer >= 0", self.delay_steps)
        _check(
            0.0 <= self.mix_alpha <= 1.0, "strategy.mix_alpha", "a number in [0, 1]", self.mix_alpha
        )
        _check(
            self.zo_samples_per_round >= 1,
            "strategy.zo_samples_per_round",
            "an integer >= 1",
            self.zo_samples_per_round,
        )
        _check(self.zo_eps > 0, "strategy.zo_eps", "a number > 0", self.zo_eps)
        codings = ("off", "auto", "frc", "cyclic", "random")
        _check(self.coding in codings, "strategy.coding", f"one of {list(codings)}", self.coding)
        _check(self.stragglers >= 0, "strategy.stragglers", "an integer >= 0", self.stragglers)
        _check(
            self.scheduling in ("sync", "compass"),
            "strategy.scheduling",
            "'sync' or 'compass'",
            self.scheduling,
        )
        _check(self.q_min >= 1, "strategy.q_min", "an integer >= 1", self.q_min)
        _check(
            self.q_max >= self.q_min,
            "strategy.q_max",
            f"an integer >= q_min = {self.q_min}",
            self.q_max,
        )
        _check(self.zo_lr > 0, "strategy.zo_lr", "a number > 0", self.zo_lr)
        _check(
            self.zo_perturbation in ("rademacher", "gaussian"),
            "strategy.zo_perturbation",
            "'rademacher' or 'gaussian'",
            self.zo_perturbation,
        )
        _check(self.name in STRATEGIES, "strategy.name", f"one of {list(STRATEGIES)}", self.name)
        _check(
            0.0 < self.outer_lr <= 10.0, "strategy.outer_lr", "a number in (0, 10]", self.outer_lr
        )
        _check(
            0.0 <= self.outer_momentum < 1.0,
            "strategy.outer_momentum",
            "a number in [0, 1)",
            self.outer_momentum,
        )
        _check(
            self.weighting in ("tokens", "equal"),
            "strategy.weighting",
            "'tokens' or 'equal'",
            self.weighting,
        )


@dataclass(kw_only=True, slots=True)
class TransportSection:
    codec: str = "fp32"
    """Codec for updates in both directions: fp32, bf16, int8, int4, fp4-e2m1, sign1."""
    error_feedback: bool = False
    """Keep the quantization error (uplink per silo, downlink at the coordinator) and resend it."""
    block_size: int = 64
    """Values per block; each block stores one bf16 scale."""
    stochastic_rounding: bool = False
    """Round quantized values stochastically (unbiased) instead of to nearest."""
    sign_updates: bool = False
    """Each silo signs its updates with its Ed25519 key; the coordinator verifies them."""

    def __post_init__(self) -> None:
        codecs = ("fp32", "bf16", "int8", "int4", "fp4-e2m1", "sign1")
        _check(self.codec in codecs, "transport.codec", f"one of {list(codecs)}", self.codec)
        _check(
            1 <= self.block_size <= 1 << 20,
            "transport.block_size",
            "an integer in [1, 1048576]",
            self.block_size,
        )


@dataclass(kw_only=True, slots=True)
class StorageSection:
    url: str = ""
    """Blob store URL (any fsspec filesystem: file://, memory://, s3:// ...); empty = run dir."""
    checkpoint_every: int = 1
    """In simulation, also store every silo's state every N rounds (resume restarts there)."""
    keep_checkpoints: int = 2
    """How many committed rounds keep their full state (older state blobs are deleted)."""
    cache_bytes: int = 256 << 20
    """Byte budget of the in-memory cache of recent rounds (0 = no cache)."""

    def __post_init__(self) -> None:
        import fsspec

        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        _check(
            protocol in fsspec.available_protocols(),
            "storage.url",
            "empty, a local path or an fsspec URL (file://, memory://, s3:// ...)",
            self.url,
        )
        _check(
            self.checkpoint_every >= 1,
            "storage.checkpoint_every",
            "an integer >= 1",
            self.checkpoint_every,
        )
        _check(self.cache_bytes >= 0, "storage.cache_bytes", "an integer >= 0", self.cache_bytes)
        _check(
            self.keep_checkpoints >= 1,
            "storage.keep_checkpoints",
            "an integer >= 1",
            self.keep_checkpoints,
        )


@dataclass(kw_only=True, slots=True)
class RoundSection:
    timeout_s: float = 3600.0
    """Round deadline in seconds (virtual in simulation); later replies are stragglers."""
    min_silos: int = 1
    """Quorum: a round commits only with at least this many valid updates."""
    close_when: str = "all"
    """'all' (wait for every silo until the deadline) or 'quorum' (close at min_silos replies)."""
    tree: int | list[Any] = 0
    """Hierarchical aggregation: 0 = flat; k >= 2 = fan-out k; or leaf sizes, e.g. [[2, 2], 4]."""
    accumulate: str = "float"
    """Sums of updates: 'float' (fp32) or 'int64' (fixed point: bitwise equal for any tree)."""
    fraction_bits: int = 32
    """int64 accumulation: fractional bits (each w·Δ is rounded to a multiple of 2^-bits)."""

    def __post_init__(self) -> None:
        _check(
            self.accumulate in ("float", "int64"),
            "round.accumulate",
            "'float' or 'int64'",
            self.accumulate,
        )
        _check(
            8 <= self.fraction_bits <= 52,
            "round.fraction_bits",
            "an integer in [8, 52]",
            self.fraction_bits,
        )
        _check(self.timeout_s > 0, "round.timeout_s", "a number > 0", self.timeout_s)
        _check(self.min_silos >= 1, "round.min_silos", "an integer >= 1", self.min_silos)
        _check(
            self.close_when in ("all", "quorum"),
            "round.close_when",
            "'all' or 'quorum'",
            self.close_when,
        )


@dataclass(kw_only=True, slots=True)
class ReliabilitySection:
    max_update_norm: float = 0.0
    """Bound on an update's L2 norm (all tensors together); 0 = no bound."""
    norm_action: str = "reject"
    """An update over ``max_update_norm``: 'reject' it or 'clip' it to the bound."""
    max_payload_bytes: int = 0
    """Largest reply accepted, checked before decoding; 0 = twice the fp32 model plus 1 MiB."""
    max_requests_per_s: float = 100.0
    """Deployment: fleet API requests per second allowed from one client address (bursts of
    5 s worth); more are answered 429. 0 = no limit. A silo polls ~0.4/s when idle, but moves a
    model in 5 MiB chunks two at a time: ~40 (down) to ~120 (up) requests/s on a fast link."""
    quarantine_after: int = 3
    """A silo with this many rejected updates gets no more work (reported); 0 = never."""

    def __post_init__(self) -> None:
        _check(
            self.max_update_norm >= 0,
            "reliability.max_update_norm",
            "a number >= 0 (0 = no bound)",
            self.max_update_norm,
        )
        _check(
            self.norm_action in ("reject", "clip"),
            "reliability.norm_action",
            "'reject' or 'clip'",
            self.norm_action,
        )
        _check(
            self.max_payload_bytes >= 0,
            "reliability.max_payload_bytes",
            "an integer >= 0 (0 = twice the fp32 model plus 1 MiB)",
            self.max_payload_bytes,
        )
        _check(
            self.max_requests_per_s >= 0,
            "reliability.max_requests_per_s",
            "a number >= 0 (0 = no limit)",
            self.max_requests_per_s,
        )
        _check(
            self.quarantine_after >= 0,
            "reliability.quarantine_after",
            "an integer >= 0 (0 = never quarantine)",
            self.quarantine_after,
        )


@dataclass(kw_only=True, slots=True)
class FaultsSection:
    inject: list[str] = field(default_factory=list)
    """Faults to inject in simulation, each KIND@SILO:ROUND[=VALUE] (see fedtrain.client.faults),
    e.g. ["nan@silo1:2", "scale@silo3:*=-10"]."""
    drop_rate: float = 0.0
    """Probability that a silo's reply is lost in a round (seeded by run.seed)."""
    corrupt_rate: float = 0.0
    """Probability that a silo's reply arrives with a flipped byte (seeded by run.seed)."""

    def __post_init__(self) -> None:
        from fedtrain.client.faults import parse_fault

        for spec in self.inject:
            try:
                parse_fault(spec)
            except ValueError as e:
                raise ConfigError(f"faults.inject: {e}") from None
        for key, v in (("drop_rate", self.drop_rate), ("corrupt_rate", self.corrupt_rate)):
            _check(0.0 <= v < 1.0, f"faults.{key}", "a number in [0, 1)", v)


@dataclass(kw_only=True, slots=True)
class SiloProfile:
    name: str = "default"
    """Profile name (shows in events)."""
    count: int = 1
    """How many silos use this profile (profiles are assigned to silos in order)."""
    step_time_s: float = 0.0
    """Seconds per inner step on this silo's hardware; 0 = measured on this machine."""
    slowdown: float = 1.0
    """Multiplier on the step time (2.0 = half as fast)."""
    up_mbps: float = 100.0
    """Uplink bandwidth in Mbit/s."""
    down_mbps: float = 100.0
    """Downlink bandwidth in Mbit/s."""
    latency_ms: float = 20.0
    """One-way latency added to every transfer, in ms."""
    dropout: float = 0.0
    """Probability that the silo drops out of a round (no reply; it catches up next round)."""
    gpu: str = ""
    """Hardware profile ('h100', 'h200', 'a100'): with ``step_time_s = 0`` the step time is
    derived from the model's FLOPs (6 x params x tokens per step) / (peak bf16 x gpus x mfu)."""
    gpus: int = 1
    """GPUs per silo (with ``gpu``)."""
    mfu: float = 0.4
    """Model FLOPs utilisation the silo sustains (with ``gpu``)."""

    def __post_init__(self) -> None:
        key = f"simulation.profiles[{self.name}]"
        _check(self.count >= 1, f"{key}.count", "an integer >= 1", self.count)
        _check(self.step_time_s >= 0, f"{key}.step_time_s", "a number >= 0", self.step_time_s)
        _check(self.slowdown > 0, f"{key}.slowdown", "a number > 0", self.slowdown)
        _check(self.up_mbps > 0, f"{key}.up_mbps", "a number > 0", self.up_mbps)
        _check(self.down_mbps > 0, f"{key}.down_mbps", "a number > 0", self.down_mbps)
        _check(self.latency_ms >= 0, f"{key}.latency_ms", "a number >= 0", self.latency_ms)
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "a number in [0, 1)", self.dropout)
        from fedtrain.simulation.hardware import HARDWARE

        _check(
            self.gpu in ("", *HARDWARE),
            f"{key}.gpu",
            "'' or one of " + ", ".join(repr(g) for g in HARDWARE),
            self.gpu,
        )
        _check(self.gpus >= 1, f"{key}.gpus", "an integer >= 1", self.gpus)
        _check(0.0 < self.mfu <= 1.0, f"{key}.mfu", "a number in (0, 1]", self.mfu)


@dataclass(kw_only=True, slots=True)
class SimulationSection:
    engine: str = "inprocess"
    """Simulation engine: 'inprocess' (all silos in this process, virtual clock) or 'flower'
    (Flower's ServerApp/ClientApp under its simulation runtime on Ray; no virtual clock)."""
    profiles: list[SiloProfile] = field(default_factory=list)
    """Silo hardware/network profiles; empty = every silo gets the default profile."""
    step_time_jitter: float = 0.0
    """Log-normal sigma of a per-round, per-silo random slowdown (0 = none)."""
    bursty_b: int = 0
    """Bursty stragglers (B, W, λ): longest burst of rounds one silo straggles (0 = off)."""
    bursty_w: int = 5
    """Bursty stragglers: window W; in any W consecutive rounds at most λ silos straggle."""
    bursty_lambda: int = 1
    """Bursty stragglers: λ, silos that may straggle within one window."""
    bursty_rate: float = 0.3
    """Bursty stragglers: chance per round that a new burst starts (where the model allows)."""
    straggler_slowdown: float = 4.0
    """Step-time multiplier of a silo while it is in a bursty straggle."""
    analytic_params: float = 0.0
    """Analytic mode (``fedtrain simulate --analytic``): model parameters (0 = the preset's)."""
    analytic_layers: int = 0
    """Analytic mode: transformer layers (0 = the preset's)."""

    def __post_init__(self) -> None:
        _check(self.bursty_b >= 0, "simulation.bursty_b", "an integer >= 0", self.bursty_b)
        _check(
            self.bursty_w > self.bursty_b or self.bursty_b == 0,
            "simulation.bursty_w",
            f"an integer > bursty_b = {self.bursty_b}",
            self.bursty_w,
        )
        _check(
            self.bursty_lambda >= 1,
            "simulation.bursty_lambda",
            "an integer >= 1",
            self.bursty_lambda,
        )
        _check(
            0.0 <= self.bursty_rate <= 1.0,
            "simulation.bursty_rate",
            "a number in [0, 1]",
            self.bursty_rate,
        )
        _check(
            self.straggler_slowdown >= 1.0,
            "simulation.straggler_slowdown",
            "a number >= 1",
            self.straggler_slowdown,
        )
        _check(
            self.engine in ("inprocess", "flower"),
            "simulation.engine",
            "'inprocess' or 'flower'",
            self.engine,
        )
        _check(
            self.analytic_params >= 0,
            "simulation.analytic_params",
            "a number >= 0",
            self.analytic_params,
        )
        _check(
            self.analytic_layers >= 0,
            "simulation.analytic_layers",
            "an integer >= 0",
            self.analytic_layers,
        )
        _check(
            self.step_time_jitter >= 0,
            "simulation.step_time_jitter",
            "a number >= 0",
            self.step_time_jitter,
        )


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    """Run identity, length and evaluation cadence."""
    model: ModelSection = field(default_factory=ModelSection)
    """Model architecture."""
    data: DataSection = field(default_factory=DataSection)
    """Corpus, tokenizer and silo partitioning."""
    train: TrainSection = field(default_factory=TrainSection)
    """Silo-local (inner) training."""
    strategy: StrategySection = field(default_factory=StrategySection)
    """Outer algorithm."""
    transport: TransportSection = field(default_factory=TransportSection)
    """Update encoding on the wire."""
    storage: StorageSection = field(default_factory=StorageSection)
    """Where run outputs are stored."""
    round: RoundSection = field(default_factory=RoundSection)
    """When a round closes."""
    simulation: SimulationSection = field(default_factory=SimulationSection)
    """Simulated silos: engine, hardware and network."""
    reliability: ReliabilitySection = field(default_factory=ReliabilitySection)
    """Update validation limits and quarantine."""
    faults: FaultsSection = field(default_factory=FaultsSection)
    """Faults injected into simulated silos (testing and research)."""

    def __post_init__(self) -> None:
        if self.simulation.profiles:
            total = sum(p.count for p in self.simulation.profiles)
            _check(
                total == self.data.silos,
                "simulation.profiles",
                f"counts adding up to data.silos = {self.data.silos}",
                f"{total} silos",
            )
        _check(
            self.round.min_silos <= self.data.silos,
            "round.min_silos",
            f"at most data.silos = {self.data.silos}",
            self.round.min_silos,
        )
        if self.strategy.name == "streaming":
            h, p, tau = self.train.inner_steps, self.strategy.fragments, self.strategy.delay_steps
            _check(
                h % p == 0,
                "strategy.fragments",
                f"a divisor of train.inner_steps = {h} (fragments sync every H/P steps)",
                p,
            )
            _check(
                tau < h // p,
                "strategy.delay_steps",
                f"less than H/P = {h // p} (one fragment in flight at a time)",
                tau,
            )
        self._check_stragglers()
        self._check_tree()
        self._check_robust()
        names = set(self.silo_names())
        for spec in self.faults.inject:
            silo = spec.partition("@")[2].partition(":")[0]
            _check(silo in names, "faults.inject", f"silos among {sorted(names)}", spec)
        for silo in self.data.silo_data:
            _check(silo in names, "data.silo_data", f"keys among silo names {sorted(names)}", silo)

    def _check_robust(self) -> None:
        st, r = self.strategy, self.round
        kinds = ("mean", "median", "trimmed_mean", "clipped_mean")
        _check(
            st.aggregator in kinds, "strategy.aggregator", f"one of {list(kinds)}", st.aggregator
        )
        _check(
            0.0 <= st.trim_fraction < 0.5,
            "strategy.trim_fraction",
            "a number in [0, 0.5)",
            st.trim_fraction,
        )
        _check(st.clip_norm > 0, "strategy.clip_norm", "a number > 0", st.clip_norm)
        if st.aggregator == "mean":
            return
        why = (
            "holds every update of the round in memory"
            if st.aggregator != "clipped_mean"
            else "clips each update before the sum"
        )
        for ok, other in (
            (st.name in ("diloco", "fedavg", "streaming"), f"strategy.name = {st.name!r}"),
            (st.coding == "off", f"strategy.coding = {st.coding!r} (gradient-code decode)"),
            (st.scheduling == "sync", f"strategy.scheduling = {st.scheduling!r}"),
            (r.tree in (0, []), f"round.tree = {r.tree!r} (hierarchical partial sums)"),
            (r.accumulate == "float", f"round.accumulate = {r.accumulate!r} (int64 sums)"),
        ):
            _check(
                ok,
                "strategy.aggregator",
                f"'mean' with {other}: {st.aggregator} {why} and cannot combine with it",
                st.aggregator,
            )

    def _check_tree(self) -> None:
        r, st = self.round, self.strategy
        from fedtrain.aggregation.shape import parse_tree

        try:
            tree = parse_tree(r.tree, self.data.silos)
        except ValueError as e:
            raise ConfigError(f"round.tree: {r.tree!r} is not allowed; expected {e}") from None
        if tree is None and r.accumulate == "float":
            return
        key, value = ("round.tree", r.tree) if tree is not None else ("round.accumulate", "int64")
        off = "0 (flat)" if tree is not None else "'float'"
        _check(
            st.name in ("diloco", "fedavg", "streaming"),
            key,
            f"{off} with strategy.name = {st.name!r} (trees and int64 sums serve the weighted "
            "mean of DiLoCo, FedAvg and Streaming DiLoCo updates)",
            value,
        )
        _check(
            st.coding == "off",
            key,
            f"{off} with strategy.coding = {st.coding!r} (the gradient-code decode needs each "
            "reply with its own coefficient, known only when the round closes)",
            value,
        )
        _check(
            st.scheduling == "sync",
            key,
            f"{off} with strategy.scheduling = {st.scheduling!r} (compass merges arrival "
            "groups with staleness weights in its own aggregator)",
            value,
        )

    def _check_stragglers(self) -> None:
        st = self.strategy
        if st.coding != "off":
            _check(
                st.name in ("diloco", "fedavg"),
                "strategy.coding",
                f"'off' with strategy.name = {st.name!r} (coded rounds are DiLoCo/FedAvg rounds)",
                st.coding,
            )
            _check(
                not self.data.silo_data,
                "strategy.coding",
                "'off' when silos train on private data (data.silo_data): coding replicates "
                "shards across silos, and private data is never replicated",
                st.coding,
            )
            _check(
                st.stragglers < self.data.silos,
                "strategy.stragglers",
                f"less than data.silos = {self.data.silos}",
                st.stragglers,
            )
            _check(
                not self.transport.error_feedback,
                "transport.error_feedback",
                "false with gradient coding (the decode coefficients would mix each silo's "
                "residual into the sum)",
                self.transport.error_feedback,
            )
            _check(
                st.scheduling == "sync",
                "strategy.scheduling",
                "'sync' with gradient coding (a coded round needs every shard from one start)",
                st.scheduling,
            )
        elif st.stragglers:
            _check(False, "strategy.stragglers", "0 unless strategy.coding is set", st.stragglers)
        if st.scheduling == "compass":
            _check(
                st.name in ("diloco", "fedavg"),
                "strategy.scheduling",
                f"'sync' with strategy.name = {st.name!r} (compass schedules DiLoCo rounds)",
                st.scheduling,
            )
            _check(
                not self.transport.error_feedback,
                "transport.error_feedback",
                "false with compass scheduling (a silo may miss several broadcasts, so the "
                "acknowledgement of its update is not in the next one)",
                self.transport.error_feedback,
            )

    def silo_names(self) -> list[str]:
        """Silo names in canonical order (silo0, silo1, ...)."""
        return [f"silo{i}" for i in range(self.data.silos)]

    def silo_profiles(self) -> list[SiloProfile]:
        """One profile per silo, in silo order."""
        if not self.simulation.profiles:
            return [SiloProfile() for _ in range(self.data.silos)]
        out: list[SiloProfile] = []
        for p in self.simulation.profiles:
            out.extend([p] * p.count)
        return out

    def round_tokens(self) -> int:
        """Tokens all silos process in one full DiLoCo round."""
        return self.data.silos * self.train.inner_steps * self.train.tokens_per_step

    def steps_per_round(self) -> int:
        """Inner steps between two commits: H (DiLoCo), H/P (streaming), 1 (DDP)."""
        if self.strategy.name == "ddp":
            return 1
        if self.strategy.name == "streaming":
            return self.train.inner_steps // self.strategy.fragments
        if self.strategy.name == "zo":
            return self.strategy.zo_samples_per_round
        return self.train.inner_steps

    def total_inner_steps(self) -> int:
        """Inner steps each silo takes over the whole run (length of the LR schedule)."""
        per_step = self.data.silos * self.train.tokens_per_step
        by_budget = -(-self.run.token_budget // per_step) if self.run.token_budget else 0
        by_rounds = self.run.rounds * self.steps_per_round()
        candidates = [s for s in (by_budget, by_rounds) if s > 0]
        return min(candidates)


_SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a TOML table, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        full = f"{prefix}.{key}" if prefix else key
        if name not in fields:
            raise ConfigError(f"unknown key '{full}' (allowed: {', '.join(sorted(fields))})")
        kwargs[name] = _coerce(hints[name], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        return value  # checked by the section's __post_init__
    if origin is types.UnionType:
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        names = [
            words.get(o, "a list" if typing.get_origin(o) is list else str(o))
            for o in typing.get_args(tp)
        ]
        raise ConfigError(f"{key}: expected {' or '.join(names)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested dicts (as parsed from TOML)."""
    for key in data:
        if key.replace("-", "_") not in _SECTIONS:
            raise ConfigError(f"unknown section '{key}' (allowed: {', '.join(sorted(_SECTIONS))})")
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (TOML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def config_sha256(cfg: Config) -> str:
    """Stable hash of the resolved config (canonical JSON)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings); else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a parsed TOML dict (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.inner_steps=20")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: KEY must be section.key, e.g. run.rounds")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a table")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def packaged_example(name: str = "quickstart") -> Path:
    """Path of a config shipped inside the package (``fedtrain/examples/NAME.toml``)."""
    path = Path(__file__).parent / "examples" / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"no packaged example config named {name!r}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML run config (default: the packaged quickstart) and apply overrides."""
    p = Path(path) if path is not None else packaged_example()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))
