"""The silo daemon's ranks: what every rank builds, and how ranks > 0 follow rank 0.

Rank 0 serves the mailbox and announces each run it opens (``("open", run dir)``) and its own
exit (``("exit", "")``) to the other ranks; they build the same trainer and follow its
operations (:meth:`~fedtrain.client.sharded.ShardedTrainer.follow`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["announce_top", "build_run", "follow"]


def build_run(run_dir: Path, silo: str, data: str | None) -> tuple[Any, Any, Any]:
    """(cfg, ShardedTrainer, SiloData) for the run whose manifest is in ``run_dir`` (all ranks)."""
    from fedtrain.client.sharded import ShardedTrainer
    from fedtrain.config import load_config
    from fedtrain.data.prepare import silo_data
    from fedtrain.data.stream import TokenStream
    from fedtrain.data.tokenizer import load_tokenizer
    from fedtrain.models.llama import build_model
    from fedtrain.models.presets import PRESETS

    cfg = load_config(run_dir / "config.toml")
    tok = load_tokenizer(run_dir / "tokenizer.json")
    sd = silo_data(cfg, silo, run_dir / "tokenizer.json", data)
    model = build_model(
        PRESETS[cfg.model.preset], tok.vocab_size, cfg.run.seed, tie=cfg.model.tie_embeddings
    )
    trainer = ShardedTrainer(
        silo,
        model,
        TokenStream(sd.tokens, cfg.run.seed, silo, cfg.data.order, cfg.train.grad_accum),
        cfg.train,
        cfg.total_inner_steps(),
    )
    return cfg, trainer, sd


def announce_top(op: str, arg: str) -> None:
    """Rank 0: tell the other ranks (if any) to open a run (``"open"``) or to exit."""
    if dist.get_world_size() > 1:
        dist.broadcast_object_list([(op, arg)], src=0)


def follow(silo: str, data: str | None) -> None:
    """Ranks > 0: build the trainer for each run rank 0 opens and follow its operations."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        op, arg = box[0]
        if op == "exit":
            return
        _, trainer, _ = build_run(Path(arg), silo, data)
        trainer.follow()
