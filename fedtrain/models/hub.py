"""A run's model as a Hugging Face Llama: config, weight names, RoPE layout, tokenizer.

fedtrain's attention rotates interleaved pairs (dims 2i, 2i+1 share frequency i, as Meta's
reference code); Hugging Face's Llama rotates halves (dims i and i + d/2). Attention scores only
depend on q·k, so permuting the rows of ``wq`` and ``wk`` within each head (evens first, then
odds) turns one layout into the other exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedtrain.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, eod_id
from fedtrain.models.presets import ModelShape

__all__ = ["hf_config", "hf_tokenizer", "to_hf_names", "write_hf_model"]

_LAYER = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def _halves_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved-pair to half-split RoPE order, per head."""
    out_dim, in_dim = w.shape
    head = out_dim // n_heads
    return w.view(n_heads, head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf_names(weights: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """fedtrain parameter names and layout → Hugging Face ``LlamaForCausalLM`` state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name in _TOP:
            out[_TOP[name]] = t.contiguous()
        elif name == "head.weight":
            out["lm_head.weight"] = t.contiguous()
        elif name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER:
                raise ValueError(f"parameter {name} has no Hugging Face Llama counterpart")
            if rest in ("attn.wq.weight", "attn.wk.weight"):
                t = _halves_rows(t, shape.n_heads)
            out[f"model.layers.{idx}.{_LAYER[rest]}"] = t.contiguous()
        else:
            raise ValueError(f"parameter {name} has no Hugging Face Llama counterpart")
    return out


def hf_config(
    shape: ModelShape, vocab_size: int, tie: bool, bos: int | None, eos: int | None
) -> dict[str, Any]:
    """``config.json`` of the equivalent ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn_dim,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_heads,
        "head_dim": shape.dim // shape.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _byte_tokenizer_json(eod: bool) -> str:
    """A ``tokenizers`` model whose ids are the UTF-8 bytes (and 256 = end of document)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if eod:
        tok.add_special_tokens(["<|endoftext|>"])
    return str(tok.to_str())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what ByteLevel pre-tokenises to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer(tok: Tokenizer) -> tuple[str, dict[str, Any]]:
    """``tokenizer.json`` text and ``tokenizer_config.json`` for the run's tokenizer."""
    if isinstance(tok, ByteTokenizer):
        text = _byte_tokenizer_json(tok.eod)
    elif isinstance(tok, BPETokenizer):
        text = str(tok._tok.to_str())  # type: ignore[attr-defined]
    else:  # pragma: no cover - the two kinds a run can have
        raise ValueError(f"cannot export a {type(tok).__name__}")
    eos = eod_id(tok)
    eos_token = None
    if eos is not None:
        from tokenizers import Tokenizer as HFTokenizer

        eos_token = HFTokenizer.from_str(text).id_to_token(eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    return text, config


def write_hf_model(
    out: Path,
    weights: dict[str, torch.Tensor],
    shape: ModelShape,
    tok: Tokenizer,
    tie: bool,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
    tokenizer files into ``out`` (created); the paths written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    eos = eod_id(tok)
    vocab = int(weights["tok_emb.weight"].shape[0])
    config = hf_config(shape, vocab, tie, None, eos)
    if extra:
        config["fedtrain"] = extra
    files = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps({"eos_token_id": eos, "bos_token_id": None}) + "\n",
    }
    tok_text, tok_config = hf_tokenizer(tok)
    files["tokenizer.json"] = tok_text
    files["tokenizer_config.json"] = json.dumps(tok_config, indent=2) + "\n"
    files["special_tokens_map.json"] = (
        json.dumps({"eos_token": tok_config["eos_token"]} if tok_config["eos_token"] else {}) + "\n"
    )
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    state = to_hf_names(weights, shape)
    path = out / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    written.append(path)
    return written
