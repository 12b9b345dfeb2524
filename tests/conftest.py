"""Shared fixtures: tiny configs and one shared simulation run per module where possible."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from fedtrain.config import Config, config_from_dict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared-token cache of the whole session (also inherited by the processes tests start).
os.environ.setdefault("FEDTRAIN_DATA_CACHE", tempfile.mkdtemp(prefix="fedtrain-data-cache-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config_dict(**sections: dict) -> dict:
    """A fast config: tiny model, bytes, 2 silos, short sequences, no token budget."""
    base: dict = {
        "run": {"name": "test", "seed": 0, "rounds": 3, "eval_batches": 8},
        "model": {"preset": "tiny"},
        "data": {"silos": 2, "tokenizer": "byte", "max_chars": 400_000},
        "train": {"inner_steps": 10, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 5},
        "round": {"min_silos": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


@pytest.fixture
def tiny_cfg() -> Config:
    return config_from_dict(tiny_config_dict())
