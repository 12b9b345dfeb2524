"""Token streams: deterministic training batches per (silo, step) and fixed eval windows."""

from __future__ import annotations

import hashlib
from typing import Union

import torch

from fedtrain.data.shards import ShardedTokens

__all__ = [
    "TokenSource",
    "TokenStream",
    "derive_seed",
    "eval_windows",
    "unigram_cross_entropy",
]


def derive_seed(*parts: object) -> int:
    """63-bit seed from a fixed serialisation of ``parts`` (stable across processes/machines)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


TokenSource = Union[torch.Tensor, ShardedTokens]
"""A silo's training tokens: a 1-D tensor in memory, or memory-mapped shards."""

ORDERS = ("random", "sequential")


def _windows(tokens: TokenSource, starts: torch.Tensor, length: int) -> torch.Tensor:
    """int64 ``(len(starts), length)`` rows ``tokens[s : s + length]``."""
    if isinstance(tokens, torch.Tensor):
        return tokens[starts[:, None] + torch.arange(length)[None, :]].to(torch.int64)
    return torch.from_numpy(tokens.windows(starts.numpy(), length))


class TokenStream:
    """Windows from one silo's tokens; batch ``(step, micro)`` is a pure function.

    Because a batch depends only on (seed, silo, step, micro), the data position of a silo is
    just its step counter: restarts resume the exact same sequence of batches. ``order =
    "random"`` draws window starts from a generator seeded by those; ``"sequential"`` walks
    non-overlapping windows in order (each token once per epoch; ``accum`` micro-batches per
    step). The tokens may be memory-mapped shards: only the windows drawn are read.
    """

    def __init__(
        self,
        tokens: TokenSource,
        seed: int,
        stream_id: str,
        order: str = "random",
        accum: int = 1,
    ) -> None:
        if isinstance(tokens, torch.Tensor):
            if tokens.ndim != 1:
                raise ValueError("tokens must be a 1-D tensor")
            tokens = tokens.to(torch.int64)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.tokens = tokens
        self.seed = seed
        self.stream_id = stream_id
        self.order = order
        self.accum = accum

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def _check(self, seq_len: int) -> int:
        n = len(self) - seq_len - 1
        if n < 1:
            raise ValueError(
                f"stream {self.stream_id!r} has {len(self)} tokens, too few for "
                f"sequences of {seq_len}"
            )
        return n

    def epoch(self, step: int, batch_size: int, seq_len: int) -> float:
        """Passes over the data completed after ``step`` inner steps (sequential order)."""
        per_epoch = (len(self) - 1) // seq_len
        return step * self.accum * batch_size / max(per_epoch, 1)

    def batch(
        self, step: int, micro: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(batch_size, seq_len)``."""
        n = self._check(seq_len)
        if self.order == "sequential":
            per_epoch = (len(self) - 1) // seq_len
            first = (step * self.accum + micro) * batch_size
            starts = (torch.arange(first, first + batch_size) % per_epoch) * seq_len
        else:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.stream_id, step, micro))
            starts = torch.randint(0, n + 1, (batch_size,), generator=gen)
        window = _windows(self.tokens, starts, seq_len + 1)
        return window[:, :-1], window[:, 1:]


def eval_windows(tokens: TokenSource, count: int, seq_len: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens, evenly spaced over ``tokens``."""
    n = int(tokens.numel()) - seq_len - 1
    if n < 0:
        raise ValueError(f"eval split has {tokens.numel()} tokens, too few for {seq_len}")
    # float32 is exact below 2**24 (and keeps recorded runs' windows); beyond it, float64 so
    # no start lands past the end.
    dtype = torch.float32 if n < 1 << 24 else torch.float64
    starts = torch.linspace(0, n, count, dtype=dtype).round().to(torch.int64)
    return _windows(tokens, starts, seq_len + 1)


def unigram_cross_entropy(counts: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy (nats) of an add-one-smoothed unigram model with token ``counts`` (one per
    vocabulary id) on ``targets``."""
    c = counts.double() + 1.0
    logp = (c / c.sum()).log()
    return float(-logp[targets.to(torch.int64).flatten()].mean())
