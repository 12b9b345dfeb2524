"""Sections ``[transport]``, ``[storage]``, ``[round]``, ``[reliability]`` and ``[faults]``:
how updates travel, where they are kept, when a round closes, which updates count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtrain.config.errors import ConfigError
from fedtrain.config.errors import check as _check

__all__ = [
    "FaultsSection",
    "ReliabilitySection",
    "RoundSection",
    "StorageSection",
    "TransportSection",
]


@dataclass(kw_only=True, slots=True)
class TransportSection:
    codec: str = "fp32"
    """Codec for updates in both directions: fp32, bf16, int8, int4, fp4-e2m1, sign1, and the
    sparse topk-int2 / topk-int4 (top-k per chunk; need error_feedback)."""
    error_feedback: bool = False
    """Keep the quantization error (uplink per silo, downlink at the coordinator) and resend it."""
    block_size: int = 64
    """Values per block; each block stores one bf16 scale."""
    stochastic_rounding: bool = False
    """Round quantized values stochastically (unbiased) instead of to nearest."""
    sign_updates: bool = False
    """Each silo signs its updates with its Ed25519 key; the coordinator verifies them."""
    chunk: int = 4096
    """Sparse codecs: values per chunk (a power of two; SparseLoCo's 64x64 = 4096)."""
    density: float = 0.0156
    """Sparse codecs: fraction of each chunk kept (k = round(density * chunk), at least 1)."""

    def __post_init__(self) -> None:
        codecs = ("fp32", "bf16", "int8", "int4", "fp4-e2m1", "sign1", "topk-int2", "topk-int4")
        _check(self.codec in codecs, "transport.codec", f"one of {list(codecs)}", self.codec)
        _check(
            1 <= self.block_size <= 1 << 20,
            "transport.block_size",
            "an integer in [1, 1048576]",
            self.block_size,
        )
        _check(
            16 <= self.chunk <= 1 << 16 and not self.chunk & (self.chunk - 1),
            "transport.chunk",
            "a power of two in [16, 65536]",
            self.chunk,
        )
        bits = self.chunk.bit_length() - 1
        _check(
            0 < self.density <= 1 / bits,
            "transport.density",
            f"in (0, 1/log2(chunk)] = (0, {1 / bits:.4g}] (denser: use int4 or int8)",
            self.density,
        )
        _check(
            not self.sparse or self.error_feedback,
            "transport.error_feedback",
            f"true with the sparse codec {self.codec} (what it drops must be resent)",
            self.error_feedback,
        )

    @property
    def sparse(self) -> bool:
        return self.codec.startswith("topk-")

    @property
    def keep(self) -> int:
        """Values kept per chunk by a sparse codec (0 for the others)."""
        return max(1, round(self.density * self.chunk)) if self.sparse else 0

    def codec_args(self) -> dict[str, int]:
        """``block_size`` and ``keep`` for :func:`~fedtrain.transport.codecs.get_codec` and
        payload writers: the chunk for a sparse codec, else the block size."""
        return {"block_size": self.chunk if self.sparse else self.block_size, "keep": self.keep}


@dataclass(kw_only=True, slots=True)
class StorageSection:
    url: str = ""
    """Blob store URL (any fsspec filesystem: file://, memory://, s3:// ...); empty = run dir."""
    checkpoint_every: int = 1
    """In simulation, also store every silo's state every N rounds (resume restarts there)."""
    keep_checkpoints: int = 2
    """How many committed rounds keep their full state (older state blobs are deleted)."""
    keep_updates: int = 2
    """Rounds (the newest) for which every silo's update payload and the aggregate are kept
    (the metadata cache's workloads read them); older ones are deleted after the commit that
    stops referencing them. 0 keeps none."""
    keep_weights: int = 0
    """Also keep the global weights of every k-th round (0: only those of the kept rounds and
    checkpoints; the initial weights are always kept)."""
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
        for key in ("keep_updates", "keep_weights"):
            value = getattr(self, key)
            _check(
                isinstance(value, int) and value >= 0,
                f"storage.{key}",
                "an integer >= 0",
                value,
            )
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
    """Faults to inject in simulation, each KIND@SILO:ROUND[=VALUE] (see fedtrain.transport.faults),
    e.g. ["nan@silo1:2", "scale@silo3:*=-10"]."""
    drop_rate: float = 0.0
    """Probability that a silo's reply is lost in a round (seeded by run.seed)."""
    corrupt_rate: float = 0.0
    """Probability that a silo's reply arrives with a flipped byte (seeded by run.seed)."""

    def __post_init__(self) -> None:
        from fedtrain.transport.faults import parse_fault

        for spec in self.inject:
            try:
                parse_fault(spec)
            except ValueError as e:
                raise ConfigError(f"faults.inject: {e}") from None
        for key, v in (("drop_rate", self.drop_rate), ("corrupt_rate", self.corrupt_rate)):
            _check(0.0 <= v < 1.0, f"faults.{key}", "a number in [0, 1)", v)
