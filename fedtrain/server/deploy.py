"""The deployed run inside Flower's ServerApp: one coordinator per run directory, the run
assembled (:mod:`fedtrain.run`) around a :class:`~fedtrain.server.flower_engine.FlowerEngine`,
the silos' signing keys, a log line per round.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedtrain.config import Config
from fedtrain.run import EngineFactory, EngineInputs, RunExists, build_run
from fedtrain.runtime.files import hold_lock
from fedtrain.server.flower_engine import DeploymentError, FlowerEngine

__all__ = ["DeploymentError", "engine_factory", "serve"]

log = logging.getLogger("fedtrain.server")


def engine_factory(
    grid: Grid,
    *,
    public_keys: dict[str, Any] | None = None,
    engine_cls: type[FlowerEngine] = FlowerEngine,
    **engine_kw: Any,
) -> EngineFactory:
    """An engine factory for :func:`~fedtrain.run.build_run`: a Flower engine over ``grid``
    whose manifest and resync weights come from the run being built (its config file in the
    run directory, tokenizer and coordinator model) and whose events go to the run store.
    ``engine_kw`` go to ``engine_cls``."""

    def make_engine(inputs: EngineInputs) -> FlowerEngine:
        from fedtrain.protocol.manifest import build_manifest
        from fedtrain.transport.payload import encode_payload

        cfg, data, model, run_id = inputs.cfg, inputs.data, inputs.model, inputs.run_id
        tokenizer = data.tokenizer_path.read_bytes()
        manifest = build_manifest(
            cfg,
            run_id,
            (inputs.run_dir / "config.toml").read_text(),
            tokenizer,
            data.tokenizer.vocab_size,
        )

        def weights(rnd: int) -> bytes:
            tensors = {n: p.detach() for n, p in model.named_parameters()}
            return encode_payload(
                tensors,
                codec="fp32",
                kind="weights",
                run_id=run_id,
                round=rnd,
                sender="coordinator",
            )

        return engine_cls(
            grid,
            silos=cfg.silo_names(),
            run_id=run_id,
            manifest=manifest,
            tokenizer=tokenizer,
            weights=weights,
            on_event=inputs.store.event,
            public_keys=public_keys,
            **engine_kw,
        )

    return make_engine


class _RunLock:
    """One coordinator per run directory (a killed one's ServerApp may still be exiting)."""

    def __init__(self, run_dir: Path, wait_s: float = 60.0) -> None:
        f = hold_lock(run_dir / ".coordinator.lock", wait_s)
        if f is None:
            raise DeploymentError(f"{run_dir} is in use by another coordinator process")
        self.f = f

    def release(self) -> None:
        self.f.close()  # closing the file drops the flock


def serve(
    grid: Grid,
    *,
    run_dir: Path,
    config: str | None = None,
    overrides: list[str] | None = None,
    join_timeout_s: float = 600.0,
    keys_dir: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the federated run in ``run_dir`` over ``grid``; return its summary."""
    lock = _RunLock(run_dir)
    try:
        cfg, resume = _run_config(run_dir, config, overrides)
        make_engine = engine_factory(grid, public_keys=_signing_keys(cfg, keys_dir))
        run = build_run(
            cfg, run_dir, make_engine, quiet=True, resume=resume, silo_checkpoints=False
        )
        engine = run.engine
        assert isinstance(engine, FlowerEngine)
        log.info(
            "run %s: %s, silos %s; waiting for them to join",
            run.run_id,
            cfg.strategy.name,
            ", ".join(cfg.silo_names()),
        )
        try:
            engine.connect(join_timeout_s)
            run.coordinator.on_round = _print_round
            summary = run.execute()
        except Exception as e:
            reason = str(e) if isinstance(e, DeploymentError) else f"{type(e).__name__}: {e}"
            run.store.event("run_failed", reason=reason)
            raise
        from fedtrain.runtime.children import peak_rss_bytes

        summary["deployment"] = {
            "resync_bytes": engine.resync_bytes,
            "coordinator_peak_rss": peak_rss_bytes(),
        }
        run.store.dir.write_json("summary.json", summary)
        log.info(
            "run finished: %d rounds, eval loss %.4f -> %.4f, %.1f MB up, %.1f MB down",
            summary["rounds"],
            summary["initial_eval_loss"],
            summary["final_eval_loss"],
            summary["bytes_up"] / 1e6,
            summary["bytes_down"] / 1e6,
        )
        return summary
    finally:
        lock.release()


def _run_config(
    run_dir: Path, config: str | None, overrides: list[str] | None
) -> tuple[Config, bool]:
    """The run's config and whether it resumes (a run index exists in ``run_dir``)."""
    from fedtrain.config import load_config

    resume = (run_dir / "index.sqlite").exists()
    if not resume:
        cfg = load_config(config or None, overrides or [], purpose="deploy")
        check_deployable(cfg)  # also when the app was submitted with `flwr run` directly
        return cfg, False
    if (run_dir / "summary.json").exists():
        raise RunExists(f"{run_dir}: the run already finished")
    cfg = load_config(run_dir / "config.toml", purpose="deploy")
    log.info("resuming the run in %s", run_dir)
    return cfg, True


def check_deployable(cfg: Config) -> None:
    """Refuse, naming the setting, a strategy that cannot run in deployment."""
    from fedtrain.strategies.registry import require_engine, spec_for

    runs_on = ", ".join(sorted(spec_for(cfg).engines))
    require_engine(
        cfg, "deploy", "in deployment", "use `fedtrain simulate`", f"it runs on: {runs_on}"
    )


def _print_round(row: dict[str, Any]) -> None:
    ev = row.get("eval_loss")
    log.info(
        "round %d: %d silos, train loss %s, eval loss %s, %.2f MB up, %.1fs",
        row["round"],
        row["silos"],
        "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
        "-" if ev is None or (isinstance(ev, float) and math.isnan(ev)) else f"{ev:.4f}",
        row["bytes_up"] / 1e6,
        row["round_time_s"],
    )


def _signing_keys(cfg: Any, keys_dir: Path | None) -> dict[str, Any]:
    """The silos' Ed25519 update-signing public keys (``KEYS/silos/NAME/sign_key.pub``)."""
    if not cfg.transport.sign_updates:
        return {}
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if keys_dir is None:
        raise DeploymentError("transport.sign_updates needs the keys directory (--tls-dir)")
    keys = {}
    for silo in cfg.silo_names():
        path = keys_dir / "silos" / silo / "sign_key.pub"
        if not path.exists():
            raise DeploymentError(
                f"transport.sign_updates: no signing key for silo {silo} ({path})"
            )
        keys[silo] = load_pem_public_key(path.read_bytes())
    return keys
