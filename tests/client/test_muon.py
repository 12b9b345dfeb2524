"""Muon inner optimizer (MuLoCo): Muon on hidden matrices, AdamW on the rest; resume bitwise."""

from __future__ import annotations

import torch

from fedtrain.client import SiloTrainer
from fedtrain.config import TrainSection
from fedtrain.data import TokenStream
from fedtrain.models import PRESETS, build_model
from fedtrain.optim import MuonAdamW


def _muon_trainer() -> SiloTrainer:
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainSection(batch_size=2, seq_len=16, warmup_steps=0, lr=2e-3, optimizer="muon")
    model = build_model(PRESETS["tiny"], 256, 0)
    return SiloTrainer("s", model, TokenStream(tokens, seed=0, stream_id="s"), cfg, 10)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    t = _muon_trainer()
    opt = t.optimizer
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in t.params.items()}
    on_muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert on_muon and all(".attn." in n or ".ffn." in n for n in on_muon)
    assert "tok_emb.weight" in on_adamw and "norm.weight" in on_adamw
    assert on_muon | on_adamw == set(t.params) and not on_muon & on_adamw
    before = {n: p.detach().clone() for n, p in t.params.items()}
    t.train(2)
    assert all(not torch.equal(before[n], p) for n, p in t.params.items())
    assert {g["lr"] for g in opt.param_groups} == {opt.param_groups[0]["lr"]}  # the schedule's


def test_state_round_trip_continues_bitwise():
    a = _muon_trainer()
    a.train(3)
    tensors, meta = a.state_tensors()
    assert any(k.endswith("::momentum_buffer") for k in tensors)  # Muon's
    assert any(k.endswith("::exp_avg_sq") for k in tensors)  # AdamW's
    b = _muon_trainer()
    b.load_state_tensors({k: v.clone() for k, v in tensors.items()}, meta)
    a.train(3)
    b.train(3)
    for n, p in a.params.items():
        assert torch.equal(p, b.params[n]), n
