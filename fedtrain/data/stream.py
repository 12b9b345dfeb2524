"""Token streams: deterministic training batches per (silo, step) and fixed eval windows."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["TokenStream", "derive_seed", "eval_windows", "unigram_cross_entropy"]


def derive_seed(*parts: object) -> int:
    """63-bit seed from a fixed serialisation of ``parts`` (stable across processes/machines)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class TokenStream:
    """Random windows from one silo's token array; batch ``(step, micro)`` is a pure function.

    Because a batch depends only on (seed, silo, step, micro), the data position of a silo is
    just its step counter: restarts resume the exact same sequence of batches.
    """

    def __init__(self, tokens: torch.Tensor, seed: int, stream_id: str) -> None:
        if tokens.ndim != 1:
            raise ValueError("tokens must be a 1-D tensor")
        self.tokens = tokens.to(torch.int64)
        self.seed = seed
        self.stream_id = stream_id

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def batch(
        self, step: int, micro: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(batch_size, seq_len)``."""
        n = self.tokens.numel() - seq_len - 1
        if n < 1:
            raise ValueError(
                f"stream {self.stream_id!r} has {self.tokens.numel()} tokens, too few for "
                f"sequences of {seq_len}"
            )
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.stream_id, step, micro))
        starts = torch.randint(0, n + 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        window = self.tokens[idx]
        return window[:, :-1], window[:, 1:]


def eval_windows(tokens: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` tokens, evenly spaced over ``tokens``."""
    n = tokens.numel() - seq_len - 1
    if n < 0:
        raise ValueError(f"eval split has {tokens.numel()} tokens, too few for {seq_len}")
    starts = torch.linspace(0, n, count).round().to(torch.int64)
    return tokens.to(torch.int64)[starts[:, None] + torch.arange(seq_len + 1)[None, :]]


def unigram_cross_entropy(train: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of an add-one-smoothed unigram model of ``train`` on ``targets``."""
    counts = torch.bincount(train.to(torch.int64), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[targets.to(torch.int64).flatten()].mean())
