"""``fedtrain simulate``: one run of the coordinator over in-process silos, outputs on disk."""

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
from fedtrain.server.coordinator import Coordinator
from fedtrain.simulation.inprocess import InProcessEngine
from fedtrain.simulation.progress import RunProgress
from fedtrain.storage.cache import MetadataCache
from fedtrain.storage.plots import plot_metrics
from fedtrain.storage.rundir import RunDir
from fedtrain.storage.runstore import NoCheckpoint, RunStore
from fedtrain.strategies import build_strategy
from fedtrain.strategies.compass import CompassDiLoCo

__all__ = [
    "NoRunToResume",
    "RunExists",
    "load_run_config",
    "Simulation",
    "build_simulation",
    "check_run_dir",
    "expected_rounds",
    "simulate",
]

log = logging.getLogger(__name__)


class RunExists(RuntimeError):
    """The run directory already holds a run; refusing to overwrite it."""


def expected_rounds(cfg: Config) -> int:
    """Rounds the run will take if every round commits."""
    steps = cfg.total_inner_steps()
    n = math.ceil(steps / cfg.steps_per_round())
    return min(n, cfg.run.rounds) if cfg.run.rounds else n


def _write_config(run: RunDir, cfg: Config) -> None:
    import tomli_w

    data = config_to_dict(cfg)
    run.write_text("config.toml", tomli_w.dumps(data))


@dataclass(slots=True)
class Simulation:
    """A wired-up simulated run: call :meth:`run` once."""

    cfg: Config
    run_dir: Path
    run: RunDir
    store: RunStore
    run_id: str
    config_sha256: str
    data: PreparedData
    model: Llama
    engine: Any
    """The engine: :class:`InProcessEngine` here, the Flower engine in a deployment."""
    coordinator: Coordinator
    progress: RunProgress
    started: float

    def execute(self) -> dict[str, Any]:
        """Train, then write weights, plots and the summary; return the summary."""
        return _execute(self)


def simulate(
    cfg: Config,
    run_dir: Path,
    *,
    quiet: bool = False,
    step_time_s: float | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` with its ``simulation.engine`` (in-process, or Flower's simulation runtime:
    :mod:`fedtrain.simulation.flower`); write the run directory; return the summary.

    With ``resume``, continue the run in ``run_dir`` from its last intact committed round.
    """
    if cfg.simulation.engine == "flower":
        from fedtrain.simulation.flower import simulate_flower

        return simulate_flower(cfg, run_dir, quiet=quiet, resume=resume)
    return build_simulation(
        cfg, run_dir, quiet=quiet, step_time_s=step_time_s, resume=resume
    ).execute()


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was started with."""
    from fedtrain.config import load_config

    if not (run_dir / "config.toml").exists():
        raise NoRunToResume(f"{run_dir} holds no run (config.toml missing)")
    return load_config(run_dir / "config.toml")


class NoRunToResume(RuntimeError):
    """``--resume`` was asked for a directory without a resumable run."""


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start over an existing run, or to resume where there is none."""
    if resume:
        if (run_dir / "summary.json").exists():
            raise RunExists(f"{run_dir}: the run already finished; nothing to resume")
        if not (run_dir / "index.sqlite").exists():
            raise NoRunToResume(f"{run_dir} has no run index to resume from")
    elif any((run_dir / f).exists() for f in ("summary.json", "metrics.jsonl", "index.sqlite")):
        raise RunExists(f"{run_dir} already holds a run; choose another --run-dir or --resume")


def build_simulation(
    cfg: Config,
    run_dir: Path,
    *,
    quiet: bool = False,
    step_time_s: float | None = None,
    resume: bool = False,
    make_engine: Callable[[PreparedData, Llama, str], Any] | None = None,
    public_keys: dict[str, Any] | None = None,
) -> Simulation:
    """Prepare data, model, strategy, engine and coordinator for ``cfg`` (no training yet).

    ``make_engine(data, model, run_id)`` replaces the in-process engine (a deployment passes its
    Flower engine, whose silos keep their own state: resuming then needs no silo checkpoints,
    and ``public_keys`` are the silos' update-signing keys).
    """
    sha = config_sha256(cfg)
    run_id = f"{cfg.run.name}-{sha[:12]}"
    check_run_dir(run_dir, resume)
    started = time.perf_counter()
    store = RunStore(run_dir, url=cfg.storage.url, keep=cfg.storage.keep_checkpoints)
    if cfg.storage.cache_bytes:
        store.cache = MetadataCache(store, cfg.storage.cache_bytes)
    run = store.dir
    stored = None
    if resume:
        if store.index.get_meta("config_sha256") != sha:
            raise NoRunToResume(f"{run_dir}: config differs from the one the run started with")
        try:
            stored = store.latest_state(require_silos=make_engine is None)
        except NoCheckpoint:
            if make_engine is None:
                raise
            stored = None  # a deployment killed before its first commit starts over
        if stored is not None:
            step_time_s = stored.state["engine"].get("measured_step_time_s") or step_time_s
    else:
        _write_config(run, cfg)
        store.index.set_meta("config_sha256", sha)
        store.index.set_meta("run_id", run_id)
        store.event("run_start", run_id=run_id, config_sha256=sha, strategy=cfg.strategy.name)

    threads = cfg.train.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    data = prepare_data(cfg, run_dir)
    shape = PRESETS[cfg.model.preset]
    vocab = data.tokenizer.vocab_size

    def factory() -> Any:
        return build_model(shape, vocab, cfg.run.seed, tie=cfg.model.tie_embeddings)

    model = factory()
    strategy = build_strategy(cfg, dict(model.named_parameters()), run_id=run_id)
    progress = RunProgress(quiet=quiet, silos=cfg.data.silos, rounds=expected_rounds(cfg))
    engine: Any
    if make_engine is None:
        engine = InProcessEngine(
            cfg, run_id, data.silo_tokens, factory, on_step=progress.step, step_time_s=step_time_s
        )
        public_keys = engine.public_keys
        if isinstance(strategy, CompassDiLoCo):
            strategy.clock = engine.sim_time_s  # schedule on the virtual clock
    else:
        engine = make_engine(data, model, run_id)
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
        public_keys=public_keys,
    )
    if stored is not None:
        coord.restore(stored)
        store.rewind_to(stored.round)
    return Simulation(
        cfg=cfg,
        run_dir=run_dir,
        run=run,
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


def _execute(sim: Simulation) -> dict[str, Any]:
    cfg, run, run_dir, data, model, engine = (
        sim.cfg,
        sim.run,
        sim.run_dir,
        sim.data,
        sim.model,
        sim.engine,
    )
    progress, run_id, sha, started = sim.progress, sim.run_id, sim.config_sha256, sim.started
    n_params = count_parameters(model)
    vocab = data.tokenizer.vocab_size
    progress.header(
        f"{cfg.run.name}: {cfg.strategy.name}, {cfg.data.silos} silos, {cfg.model.preset} "
        f"({n_params / 1e6:.2f}M params, vocab {vocab}), {cfg.total_inner_steps()} inner steps "
        f"per silo -> {run_dir}"
    )
    try:
        with progress:
            totals = sim.coordinator.run()
    finally:
        sim.coordinator.strategy.close()  # e.g. an aggregation tree's processes

    tmp = run_dir / ".model.safetensors.tmp"
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp))
    os.replace(tmp, run_dir / "model.safetensors")
    plot_metrics(totals.history, run.plots, title=f"{cfg.run.name} ({cfg.strategy.name})")
    model_bytes = 4 * n_params
    summary = {
        "run_id": run_id,
        "config_sha256": sha,
        "strategy": cfg.strategy.name,
        "codec": cfg.transport.codec,
        "silos": cfg.data.silos,
        "model_preset": cfg.model.preset,
        "parameters": n_params,
        "vocab_size": vocab,
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
        "fp32_model_bytes": model_bytes,
        "compression_up": totals.compression()["up"],
        "compression_down": totals.compression()["down"],
        "error_feedback": cfg.transport.error_feedback,
        "stragglers": totals.stragglers,
        "rejected": totals.rejected,
        "strikes": totals.strikes,
        "quarantined": totals.quarantined,
        "max_buffer_bytes": totals.max_buffer_bytes,
        "sim_time_s": engine.sim_time_s(),
        "measured_step_time_s": getattr(engine, "measured_step_time_s", None),
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
        "wall_s": round(time.perf_counter() - started, 3),
        "versions": {
            "fedtrain": fedtrain.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    run.write_json("summary.json", summary)
    run.event("run_end", final_eval_loss=totals.final_eval_loss, tokens=totals.tokens)
    progress.footer(summary)
    return summary
