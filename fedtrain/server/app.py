"""The coordinator's Flower ServerApp (component ``fedtrain.server.app:app``).

Run config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
- ``config``: path of the fedtrain run config (empty: the packaged deployment example);
- ``run-dir``: the run directory (empty: ``runs/<run.name>`` under the working directory);
- ``set``: overrides ``"key=value; key=value"`` as for ``fedtrain simulate --set``;
- ``join-timeout``: seconds to wait for every silo to join;
- ``keys-dir``: the directory made by ``fedtrain keys init`` (silo signing keys).

A run that fails leaves its reason in ``RUN_DIR/failure.txt``, which ``fedtrain server`` prints
(Flower's log stream may end before the last lines arrive).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedtrain.config import ConfigError, load_config, packaged_example
    from fedtrain.run import RunExists
    from fedtrain.server.deploy import DeploymentError, serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s coordinator %(message)s", stream=sys.stdout
    )
    log = logging.getLogger("fedtrain.server")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rc = context.run_config
    config = str(rc.get("config", "")) or str(packaged_example("deploy"))
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    given = str(rc.get("run-dir", ""))
    run_dir = Path(given).resolve() if given else None
    try:
        cfg = load_config(config, overrides, purpose="deploy")
        run_dir = run_dir or (Path("runs") / cfg.run.name).resolve()
        keys = str(rc.get("keys-dir", ""))
        serve(
            grid,
            run_dir=run_dir,
            config=config,
            overrides=overrides,
            join_timeout_s=float(rc.get("join-timeout", 600)),
            keys_dir=Path(keys) if keys else None,
        )
    except (ConfigError, DeploymentError, RunExists) as e:
        log.error("error: %s", e)
        _record(run_dir, str(e))
        raise SystemExit(2) from None
    except Exception as e:
        _record(run_dir, f"{type(e).__name__}: {e} (traceback in the run's log)")
        raise


def _record(run_dir: Path | None, reason: str) -> None:
    """Leave the reason for ``fedtrain server`` (Flower's log stream may never deliver it)."""
    from fedtrain.server.launcher import record_failure

    if run_dir is not None and run_dir.is_dir():
        try:
            record_failure(run_dir, reason)
        except OSError:
            logging.getLogger("fedtrain.server").exception("could not record the failure")
