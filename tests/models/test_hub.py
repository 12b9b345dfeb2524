"""Hugging Face export: the exported directory loads in ``transformers`` as a Llama that gives
fedtrain's logits, and its tokenizer gives the run tokenizer's ids."""

from __future__ import annotations

import json

import pytest
import torch

from fedtrain.data.tokenizer import ByteTokenizer, train_bpe
from fedtrain.models import PRESETS, build_model
from fedtrain.models.hub import _halves_rows, to_hf_names, write_hf_model

transformers = pytest.importorskip("transformers")

TEXT = "In the beginning God created the heaven and the earth. Ça, 中文, ünïcode\n\n  tabs\tend"


def _logits_match(tmp_path, tie: bool, tok) -> float:
    """Export a tiny model, load it in transformers, check tokenizer and config; return the
    largest logit difference."""
    shape = PRESETS["tiny"]
    model = build_model(shape, tok.vocab_size, seed=3, tie=tie).eval()
    with torch.no_grad():  # a trained-looking model: norms away from 1
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(n)))
    out = tmp_path / "hf"
    weights = {n: p.detach() for n, p in model.named_parameters()}
    write_hf_model(out, weights, shape, tok, tie)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(TEXT)
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == tok.decode(ids)
    x = torch.tensor([ids[:64], ids[-64:]])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape == ours.shape
    diff = float((ours - theirs).abs().max())
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert config["rope_theta"] == shape.rope_theta and config["rms_norm_eps"] == shape.norm_eps
    head = hf.lm_head.weight
    shared = head.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert shared is tie
    assert torch.equal(head, weights["tok_emb.weight" if tie else "head.weight"])
    return diff


def test_byte_tokenizer_untied_head_loads_with_equal_logits(tmp_path):
    assert _logits_match(tmp_path, tie=False, tok=ByteTokenizer(eod=True)) < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 256


def test_bpe_tokenizer_tied_embeddings_loads_with_equal_logits(tmp_path):
    words = [f"{w} verily unto thee and thine {i}" for i, w in enumerate(TEXT.split() * 40)]
    tok = train_bpe(words, vocab_size=400)
    assert _logits_match(tmp_path, tie=True, tok=tok) < 1e-4


def test_rope_rows_go_from_interleaved_pairs_to_halves():
    # One head of dim 4: rows (0, 1) and (2, 3) are rotated pairs in fedtrain's layout;
    # Hugging Face pairs rows (0, 2) and (1, 3): evens first, then odds.
    w = torch.arange(8.0).reshape(4, 2)
    assert _halves_rows(w, n_heads=1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    two = torch.arange(16.0).reshape(8, 2)
    assert _halves_rows(two, n_heads=2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="layers.0.extra.weight"):
        to_hf_names({"layers.0.extra.weight": torch.zeros(1)}, PRESETS["tiny"])
