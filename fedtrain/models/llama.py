"""A compact Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, causal SDPA.

Parameter names are stable (``layers.{i}.attn.wq.weight`` ...) because fragments, codecs and
checkpoints address parameters by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedtrain.models.presets import ModelShape

__all__ = ["Llama", "build_model", "count_parameters"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight.type_as(x)


def _rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate interleaved pairs. cos/sin cast to the activation dtype (bf16 safe).
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.n_heads = shape.n_heads
        self.head_dim = shape.dim // shape.n_heads
        self.wq = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wk = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wv = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wo = nn.Linear(shape.dim, shape.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.w1 = nn.Linear(shape.dim, shape.ffn_dim, bias=False)
        self.w3 = nn.Linear(shape.dim, shape.ffn_dim, bias=False)
        self.w2 = nn.Linear(shape.ffn_dim, shape.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.attn = Attention(shape)
        self.ffn_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.ffn = FeedForward(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only transformer in the Llama layout (Touvron et al. 2023)."""

    def __init__(self, shape: ModelShape, vocab_size: int, tie_embeddings: bool = True) -> None:
        super().__init__()
        self.shape = shape
        self.vocab_size = vocab_size
        self.tie_embeddings = tie_embeddings
        self.tok_emb = nn.Embedding(vocab_size, shape.dim)
        self.layers = nn.ModuleList(Block(shape) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.dim, shape.norm_eps)
        self.head = None if tie_embeddings else nn.Linear(shape.dim, vocab_size, bias=False)
        cos, sin = _rope_tables(shape.dim // shape.n_heads, shape.max_seq_len, shape.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        """Deterministic init from ``seed`` (independent of the global RNG)."""
        gen = torch.Generator().manual_seed(seed)
        std = 0.02
        out_std = std / math.sqrt(2 * self.shape.n_layers)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if p.ndim == 1:
                    p.fill_(1.0)
                elif name.endswith(("attn.wo.weight", "ffn.w2.weight")):
                    p.copy_(torch.randn(p.shape, generator=gen) * out_std)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.shape.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.shape.max_seq_len}")
        x = self.tok_emb(tokens)
        cos, sin = self.get_buffer("rope_cos")[:t], self.get_buffer("rope_sin")[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if self.head is None:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (computed in fp32 even under bf16 autocast)."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(shape: ModelShape, vocab_size: int, seed: int, tie: bool = True) -> Llama:
    """Build a model with deterministic weights from ``seed``."""
    model = Llama(shape, vocab_size, tie_embeddings=tie)
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
