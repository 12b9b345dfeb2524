"""Model size presets (shapes only; the vocabulary comes from the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "ModelShape"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    dim: int
    """Residual stream width."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads (head dim = dim / n_heads)."""
    ffn_dim: int
    """SwiGLU hidden width."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} even-sized heads")


PRESETS: dict[str, ModelShape] = {
    # ~0.9M parameters with the byte tokenizer: unit and end-to-end tests.
    "tiny": ModelShape(dim=128, n_layers=4, n_heads=4, ffn_dim=352),
    # ~4M parameters with a 4096-token BPE: the CPU quickstart.
    "mini": ModelShape(dim=256, n_layers=4, n_heads=4, ffn_dim=688),
    # ~10M parameters with a 4096-token BPE.
    "small": ModelShape(dim=384, n_layers=6, n_heads=6, ffn_dim=1024),
    # GPU sizes.
    "125m": ModelShape(dim=768, n_layers=12, n_heads=12, ffn_dim=2048),
    "1b": ModelShape(dim=2048, n_layers=16, n_heads=16, ffn_dim=5632),
}
