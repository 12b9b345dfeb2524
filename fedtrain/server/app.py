"""The coordinator's Flower ServerApp (component ``fedtrain.server.app:app``).

Run config keys (``[tool.flwr.app.config]`` or ``flwr run --run-config``):
- ``config``: path of the fedtrain run config (empty: the packaged deployment example);
- ``run-dir``: the run directory (empty: ``runs/<run.name>`` under the working directory);
- ``set``: overrides ``"key=value; key=value"`` as for ``fedtrain simulate --set``;
- ``join-timeout``: seconds to wait for every silo to join;
- ``keys-dir``: the directory made by ``fedtrain keys init`` (silo signing keys).
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
    try:
        cfg = load_config(config, overrides, purpose="deploy")
        run_dir = Path(str(rc.get("run-dir", "")) or Path("runs") / cfg.run.name).resolve()
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
        raise SystemExit(2) from None
