"""``fedtrain simulate --engine flower``: the real Flower apps under Flower's simulation runtime.

The coordinator is the one a deployment runs:
:class:`~fedtrain.server.flower_engine.FlowerEngine` over the ``Grid`` Flower hands our
ServerApp (which the runtime runs in a thread of this process), with the same manifest
handshake, versioned downlinks and resyncs. The silos are ``num_supernodes = data.silos``
virtual SuperNodes whose ClientApp (:mod:`fedtrain.simulation.flower_client`) runs in a pool of
Ray actors and keeps each silo's state in files under ``<run dir>/silos/<silo>/``. There is no
virtual clock: ``sim_time_s`` is None and ``round.timeout_s`` is in real seconds.

Ray's settings and lifetime are :mod:`fedtrain.simulation.ray_runtime`'s; Flower's log goes to
``<run dir>/logs/flower.log``.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from fedtrain.config import Config
from fedtrain.protocol.work import Work
from fedtrain.run import EngineInputs, build_run, check_run_dir
from fedtrain.server.deploy import engine_factory
from fedtrain.server.engine import Engine, Reply
from fedtrain.server.flower_engine import DeploymentError, FlowerEngine
from fedtrain.strategies.registry import require_engine

__all__ = ["SimulatedFlowerEngine", "check_flower_config", "simulate_flower"]

JOIN_TIMEOUT_S = 600.0
"""Seconds for every virtual silo to answer the manifest (Ray starts its actors meanwhile)."""


class Interrupted(RuntimeError):
    """The simulation was stopped while the coordinator was waiting on Flower."""


def check_flower_config(cfg: Config) -> None:
    """Refuse, with one line naming the setting, what the Flower engine cannot run."""
    engine = "simulation.engine = 'flower'"
    require_engine(
        cfg,
        "flower",
        f"with {engine}",
        "use simulation.engine = 'inprocess'",
        "it runs synchronous, uncoded rounds, as a deployment does",
    )
    if cfg.simulation.bursty_b or any(p.dropout for p in cfg.simulation.profiles):
        raise ValueError(
            "simulated stragglers (simulation.bursty_b, profile dropout) need the in-process "
            f"engine's virtual clock; {engine} has none"
        )
    f = cfg.faults
    if f.inject or f.drop_rate or f.corrupt_rate:
        raise ValueError(
            f"[faults] are injected by the in-process engine; {engine} does not (a deployed "
            "silo takes them from FEDTRAIN_FAULTS)"
        )


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(
            "simulation.engine = 'flower' needs Flower's simulation runtime (Ray), which is not "
            "installed: pip install '.[simulation]'"
        ) from None


class SimulatedFlowerEngine(FlowerEngine):
    """:class:`FlowerEngine` over virtual silos. It reports inner steps to the progress display
    and, when rounds wait for every silo (``round.close_when = 'all'``), hands the round's
    replies on once all are in, in the order the in-process engine's network model delivers
    them for identical silos (smaller uplink payload first, ties in silo order) instead of the
    order Ray's actors happen to finish in. Floating-point sums depend on that order: so runs
    repeat exactly, and equal the in-process engine's bit for bit."""

    def __init__(self, *args: Any, canonical_order: bool, on_step: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.canonical_order = canonical_order
        self.on_step = on_step

    def _absorb_hellos(self) -> None:
        refused = len(self.refused)
        super()._absorb_hellos()
        if len(self.refused) > refused:
            # A deployed silo may fix itself and come back; a virtual one will not.
            reason = list(self.refused.values())[-1]
            raise DeploymentError(f"a virtual silo could not join the run: {reason}")

    def run_round(
        self,
        round: int,
        work: dict[str, Work],
        downlink: bytes | bytearray | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        replies = super().run_round(round, work, downlink, deadline_s)
        index = {s: i for i, s in enumerate(self.silos)}
        held: list[Reply] = []
        try:
            for reply in replies:
                if reply.error is None:
                    self.on_step(work[reply.silo].steps)
                if self.canonical_order:
                    held.append(reply)
                else:
                    yield reply
            held.sort(key=lambda r: (len(r.payload or b""), index.get(r.silo, len(index))))
            yield from held
        finally:
            replies.close()  # type: ignore[attr-defined]


class _Grid:
    """The Grid Flower gives the ServerApp; refuses further use after :meth:`stop`, so an
    interrupted coordinator leaves at its next poll."""

    def __init__(self) -> None:
        self._grid: Any = None
        self._stopped = threading.Event()

    def attach(self, grid: Any) -> None:
        self._grid = grid

    def stop(self) -> None:
        self._stopped.set()

    def _live(self) -> Any:
        if self._stopped.is_set() or self._grid is None:
            raise Interrupted("the Flower simulation was stopped")
        return self._grid

    def get_node_ids(self) -> Any:
        return self._live().get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self._live().push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self._live().pull_messages(message_ids)


def _signing_keys(cfg: Config, root: Path) -> dict[str, Any]:
    """Each virtual silo's Ed25519 update-signing key in ``root/<silo>/sign_key`` (made once,
    mode 0600; a resumed run keeps its keys); returns the public keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = {}
    for silo in cfg.silo_names():
        path = root / silo / "sign_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        assert isinstance(key, Ed25519PrivateKey)
        public[silo] = key.public_key()
    return public


class _ServerSide:
    """The ServerApp's main: assembles the run in Flower's server thread and executes it."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        quiet: bool,
        resume: bool,
        public_keys: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.run_dir, self.quiet, self.resume = cfg, run_dir, quiet, resume
        self.public_keys = public_keys
        self.grid = _Grid()
        self.backend: dict[str, Any] = {}
        """Ray backend config, set before the simulation starts."""
        self.summary: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None

    def _make_engine(self, inputs: EngineInputs) -> Engine:
        make = engine_factory(
            self.grid,  # type: ignore[arg-type]  # a stoppable view of Flower's grid
            public_keys=self.public_keys,
            engine_cls=SimulatedFlowerEngine,
            hello_timeout_s=JOIN_TIMEOUT_S,
            canonical_order=self.cfg.round.close_when == "all",
            on_step=inputs.progress.step,
        )
        return make(inputs)

    def main(self, flower_grid: Grid, context: Context) -> None:
        # The run store's SQLite connection belongs to the thread that opens it: this one.
        self.thread = threading.current_thread()
        self.grid.attach(flower_grid)
        cfg = self.cfg
        run = build_run(
            cfg,
            self.run_dir,
            self._make_engine,
            quiet=self.quiet,
            resume=self.resume,
            silo_checkpoints=False,
        )
        run.store.event(
            "flower_simulation",
            supernodes=cfg.data.silos,
            cpus_per_silo=self.backend["client_resources"]["num_cpus"],
            ray_temp_dir=self.backend["init_args"]["_temp_dir"],
        )
        assert isinstance(run.engine, SimulatedFlowerEngine)
        run.engine.connect(JOIN_TIMEOUT_S)
        self.summary = run.execute()

    def stop(self) -> None:
        """Make an interrupted coordinator leave at its next poll; wait for its thread."""
        self.grid.stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)


def simulate_flower(
    cfg: Config, run_dir: Path, *, quiet: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Run ``cfg`` on the Flower engine (see the module docstring); write the run directory
    exactly as the in-process engine does; return the summary."""
    check_flower_config(cfg)
    _require_ray()
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedtrain.simulation.flower_client import make_client_app
    from fedtrain.simulation.ray_runtime import flower_log_to, ray_session

    check_run_dir(run_dir, resume)  # before Ray starts; build_run checks again
    silos_root = run_dir.resolve() / "silos"
    public_keys = _signing_keys(cfg, silos_root) if cfg.transport.sign_updates else None
    threads = max(1, cfg.train.threads or 1)
    server = _ServerSide(cfg, run_dir, quiet=quiet, resume=resume, public_keys=public_keys)
    server_app = ServerApp()
    server_app.main()(server.main)
    client_app = make_client_app(
        silos_root, cfg.silo_names(), threads=threads, signing=cfg.transport.sign_updates
    )
    with ray_session(threads) as backend, flower_log_to(run_dir / "logs" / "flower.log"):
        server.backend = backend
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.data.silos,
                backend_config=backend,
            )
        finally:
            server.stop()
    if server.summary is None:
        raise RuntimeError(f"the Flower simulation ended without finishing the run (see {run_dir})")
    # The silos' snapshots only serve a resume, and a finished run is not resumed.
    shutil.rmtree(silos_root, ignore_errors=True)
    return dict(server.summary)
