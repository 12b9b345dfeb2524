"""One run, assembled around an engine: run directory, store, resume state, data, model,
strategy, coordinator; then the end-of-run outputs (weights, plots, summary).

Every way of running uses this: ``fedtrain simulate`` (the in-process engine,
:mod:`fedtrain.simulation.runner`), ``--engine flower`` (:mod:`fedtrain.simulation.flower`)
and the deployed ServerApp (:mod:`fedtrain.server.deploy`). The caller hands in an engine
factory; it is called once the store, data and model exist (:class:`EngineInputs`), and the
strategy is built after it, on the engine's clock.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import fedtrain
from fedtrain.config import Config, config_sha256, config_to_dict
from fedtrain.data.prepare import PreparedData, prepare_data
from fedtrain.models.llama import Llama, build_model, count_parameters
from fedtrain.models.presets import PRESETS
from fedtrain.runtime.progress import RunProgress
from fedtrain.server.coordinator import Coordinator
from fedtrain.server.engine import Engine
from fedtrain.server.totals import RunTotals
from fedtrain.storage.cache import MetadataCache
from fedtrain.storage.plots import plot_metrics
from fedtrain.storage.runstore import NoCheckpoint, RunStore, StoredState
from fedtrain.strategies import build_strategy

__all__ = [
    "EngineFactory",
    "EngineInputs",
    "NoRunToResume",
    "Run",
    "RunExists",
    "build_run",
    "check_run_dir",
    "expected_rounds",
    "load_run_config",
]

log = logging.getLogger(__name__)


class RunExists(RuntimeError):
    """The run directory already holds a run; refusing to overwrite it."""


class NoRunToResume(RuntimeError):
    """``--resume`` was asked for a directory without a resumable run."""


def expected_rounds(cfg: Config) -> int:
    """Rounds the run will take if every round commits."""
    steps = cfg.total_inner_steps()
    n = math.ceil(steps / cfg.steps_per_round())
    return min(n, cfg.run.rounds) if cfg.run.rounds else n


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was started with."""
    from fedtrain.config import load_config

    if not (run_dir / "config.toml").exists():
        raise NoRunToResume(f"{run_dir} holds no run (config.toml missing)")
    return load_config(run_dir / "config.toml")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start over an existing run, or to resume where there is none."""
    if resume:
        if (run_dir / "summary.json").exists():
            raise RunExists(f"{run_dir}: the run already finished; nothing to resume")
        if not (run_dir / "index.sqlite").exists():
            raise NoRunToResume(f"{run_dir} has no run index to resume from")
    elif any((run_dir / f).exists() for f in ("summary.json", "metrics.jsonl", "index.sqlite")):
        raise RunExists(f"{run_dir} already holds a run; choose another --run-dir or --resume")


@dataclass(kw_only=True, slots=True)
class EngineInputs:
    """What an engine factory gets from the run being assembled."""

    cfg: Config
    run_dir: Path
    run_id: str
    data: PreparedData
    """Tokenizer, each silo's tokens, the eval batch."""
    model: Llama
    """The coordinator's model: the global weights."""
    model_factory: Callable[[], Llama]
    """A fresh model with the run's initial weights (e.g. one per virtual silo)."""
    store: RunStore
    """The run store (engine events go to ``store.event``)."""
    progress: RunProgress
    """The progress display (inner steps go to ``progress.step``)."""
    resumed: dict[str, Any] | None
    """Engine facts committed with the round being resumed (None: a fresh start)."""


EngineFactory = Callable[[EngineInputs], Engine]
"""Builds the run's engine once store, data and model exist."""


@dataclass(kw_only=True, slots=True)
class Run:
    """A wired-up run: call :meth:`execute` once."""

    cfg: Config
    run_dir: Path
    store: RunStore
    run_id: str
    config_sha256: str
    data: PreparedData
    model: Llama
    engine: Engine
    coordinator: Coordinator
    progress: RunProgress
    started: float
    """``time.perf_counter()`` when assembly began (the summary's ``wall_s``)."""

    def execute(self) -> dict[str, Any]:
        """Train, then write weights, plots and the summary; return the summary."""
        self.progress.header(_header(self))
        try:
            with self.progress:
                totals = self.coordinator.run()
        finally:
            self.coordinator.strategy.close()  # e.g. an aggregation tree's processes
        return write_outputs(self, totals)


def build_run(
    cfg: Config,
    run_dir: Path,
    make_engine: EngineFactory,
    *,
    quiet: bool = False,
    resume: bool = False,
    silo_checkpoints: bool = True,
) -> Run:
    """Prepare store, data, model, engine, strategy and coordinator for ``cfg`` (no training).

    With ``resume``, continue from the run's last intact committed round. ``silo_checkpoints``:
    the engine restores its silos from the run's checkpoints (in-process); False when the
    silos keep their own state (Flower): resuming then needs no silo checkpoints, and a run
    killed before its first commit starts over.
    """
    sha = config_sha256(cfg)
    run_id = f"{cfg.run.name}-{sha[:12]}"
    check_run_dir(run_dir, resume)
    started = time.perf_counter()
    store = _open_store(cfg, run_dir)
    if resume:
        stored = _stored_state(store, run_dir, sha, silo_checkpoints)
    else:
        stored = None
        _start(store, cfg, run_id, sha)
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    data = prepare_data(cfg, run_dir)
    shape, vocab = PRESETS[cfg.model.preset], data.tokenizer.vocab_size

    def factory() -> Llama:
        return build_model(shape, vocab, cfg.run.seed, tie=cfg.model.tie_embeddings)

    model = factory()
    progress = RunProgress(quiet=quiet, silos=cfg.data.silos, rounds=expected_rounds(cfg))
    engine = make_engine(
        EngineInputs(
            cfg=cfg,
            run_dir=run_dir,
            run_id=run_id,
            data=data,
            model=model,
            model_factory=factory,
            store=store,
            progress=progress,
            resumed=stored.state["engine"] if stored is not None else None,
        )
    )
    params = dict(model.named_parameters())
    # A strategy that schedules by time (Compass) runs on the engine's clock.
    strategy = build_strategy(cfg, params, run_id=run_id, clock=engine.sim_time_s)
    coord = Coordinator(
        cfg=cfg,
        run_id=run_id,
        model=model,
        strategy=strategy,
        engine=engine,
        store=store,
        eval_batch=data.eval_batch,
        on_round=progress.round_done,
        on_round_start=progress.round_start,
        public_keys=engine.public_keys,
    )
    if stored is not None:
        coord.restore(stored)
        store.rewind_to(stored.round)
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        store=store,
        run_id=run_id,
        config_sha256=sha,
        data=data,
        model=model,
        engine=engine,
        coordinator=coord,
        progress=progress,
        started=started,
    )


def _open_store(cfg: Config, run_dir: Path) -> RunStore:
    store = RunStore(
        run_dir,
        url=cfg.storage.url,
        keep=cfg.storage.keep_checkpoints,
        keep_updates=cfg.storage.keep_updates,
        keep_weights=cfg.storage.keep_weights,
        keep_aggregates=cfg.strategy.name == "zo",
    )
    if cfg.storage.cache_bytes:
        store.cache = MetadataCache(store, cfg.storage.cache_bytes)
    if cfg.run.tensorboard:
        store.dir.enable_tensorboard()
    return store


def _start(store: RunStore, cfg: Config, run_id: str, sha: str) -> None:
    """A fresh run: its resolved config and identity go into the run directory first."""
    import tomli_w

    store.dir.write_text("config.toml", tomli_w.dumps(config_to_dict(cfg)))
    store.index.set_meta("config_sha256", sha)
    store.index.set_meta("run_id", run_id)
    store.event("run_start", run_id=run_id, config_sha256=sha, strategy=cfg.strategy.name)


def _stored_state(
    store: RunStore, run_dir: Path, sha: str, silo_checkpoints: bool
) -> StoredState | None:
    """The last intact committed round to resume from (None: start over)."""
    if store.index.get_meta("config_sha256") != sha:
        raise NoRunToResume(f"{run_dir}: config differs from the one the run started with")
    try:
        return store.latest_state(require_silos=silo_checkpoints)
    except NoCheckpoint:
        if silo_checkpoints:
            raise
        return None  # a deployment killed before its first commit starts over


def _header(run: Run) -> str:
    cfg = run.cfg
    n_params = count_parameters(run.model)
    return (
        f"{cfg.run.name}: {cfg.strategy.name}, {cfg.data.silos} silos, {cfg.model.preset} "
        f"({n_params / 1e6:.2f}M params, vocab {run.data.tokenizer.vocab_size}), "
        f"{cfg.total_inner_steps()} inner steps per silo -> {run.run_dir}"
    )


def write_outputs(run: Run, totals: RunTotals) -> dict[str, Any]:
    """The end of the run: final weights, plots, ``summary.json``; return the summary."""
    cfg, run_dir = run.cfg, run.run_dir
    tmp = run_dir / ".model.safetensors.tmp"
    save_file({n: p.detach().contiguous() for n, p in run.model.named_parameters()}, str(tmp))
    os.replace(tmp, run_dir / "model.safetensors")
    plot_metrics(totals.history, run.store.dir.plots, title=f"{cfg.run.name} ({cfg.strategy.name})")
    summary = summarise(run, totals)
    run.store.dir.write_json("summary.json", summary)
    run.store.dir.event("run_end", final_eval_loss=totals.final_eval_loss, tokens=totals.tokens)
    if run.store.dir.tensorboard is not None:
        run.store.dir.tensorboard.close()
    run.progress.footer(summary)
    return summary


def summarise(run: Run, totals: RunTotals) -> dict[str, Any]:
    """The run's ``summary.json``."""
    cfg, data, engine = run.cfg, run.data, run.engine
    n_params = count_parameters(run.model)
    return {
        "run_id": run.run_id,
        "config_sha256": run.config_sha256,
        "strategy": cfg.strategy.name,
        "codec": cfg.transport.codec,
        "silos": cfg.data.silos,
        "model_preset": cfg.model.preset,
        "parameters": n_params,
        "vocab_size": data.tokenizer.vocab_size,
        "tokenizer_sha256": data.tokenizer_sha256,
        "rounds": totals.rounds,
        "rounds_failed": totals.rounds_failed,
        "inner_steps_per_silo": totals.steps,
        "tokens": totals.tokens,
        "initial_eval_loss": totals.initial_eval_loss,
        "final_eval_loss": totals.final_eval_loss,
        "unigram_eval_loss": data.unigram_eval_loss,
        "bytes_up": totals.bytes_up,
        "bytes_down": totals.bytes_down,
        "bytes_join": totals.bytes_join,
        "bytes_total": totals.bytes_up + totals.bytes_down + totals.bytes_join,
        "fp32_model_bytes": 4 * n_params,
        "compression_up": totals.compression()["up"],
        "compression_down": totals.compression()["down"],
        "error_feedback": cfg.transport.error_feedback,
        "stragglers": totals.stragglers,
        "rejected": totals.rejected,
        "strikes": totals.strikes,
        "quarantined": totals.quarantined,
        "max_buffer_bytes": totals.max_buffer_bytes,
        "sim_time_s": engine.sim_time_s(),
        "measured_step_time_s": engine.measured_step_time_s,
        "silo_compute_s": engine.compute_s,
        "compute_utilisation": engine.utilisation(),
        "max_payload_bytes": totals.max_payload_bytes,
        "peak_reduction_vs_full_model": (
            n_params / totals.max_payload_values if totals.max_payload_values else None
        ),
        "silo_groups": {
            n: g[:3] + (["..."] if len(g) > 3 else [])
            for n, g in zip(cfg.silo_names(), data.silo_groups, strict=True)
        },
        "wall_s": round(time.perf_counter() - run.started, 3),
        "versions": {
            "fedtrain": fedtrain.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
