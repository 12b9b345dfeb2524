"""Real deployments on 127.0.0.1 for tests: `fedtrain server` / `fedtrain client` processes,
each in its own process group so a test can stop (or SIGKILL, like a crash) one side whole."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY = """
[run]
name = "{name}"
seed = 0
rounds = {rounds}
eval_batches = 8
[model]
preset = "tiny"
[data]
silos = {silos}
tokenizer = "byte"
max_chars = 400000
[train]
inner_steps = {steps}
batch_size = 4
seq_len = 32
lr = 3e-3
warmup_steps = 5
[round]
min_silos = 1
timeout_s = {timeout}
"""


def tiny_config(
    path: Path, name: str, rounds: int, silos: int = 2, steps: int = 10, timeout: float = 60.0
) -> Path:
    path.write_text(
        TINY.format(name=name, rounds=rounds, silos=silos, steps=steps, timeout=timeout)
    )
    return path


class Proc:
    """A `fedtrain` command in its own session, output to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.args = args
        out = log.open("ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "fedtrain.cli.main", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT the command (Ctrl-C) and wait; SIGKILL the group if it hangs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.crash()
        return int(self.p.returncode)

    def crash(self) -> None:
        """SIGKILL the command's whole process group (a machine/power failure)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(30)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("event") == kind]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOCAL_SH_TINY = (
    "model.preset=tiny; data.tokenizer=byte; data.max_chars=400000; run.rounds=2; "
    "run.eval_batches=4; train.inner_steps=5; train.batch_size=4; train.seq_len=32; "
    "round.timeout_s=90"
)
"""``FEDTRAIN_SET`` for ``examples/deploy/local.sh``: its deployment, small enough for a test."""


def fedtrain_on_path(bin_dir: Path) -> str:
    """A ``PATH`` whose ``fedtrain`` runs this interpreter's fedtrain (with this checkout's
    ``PYTHONPATH``), ahead of the rest of ``PATH``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "fedtrain"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedtrain.cli.main "$@"\n')
    exe.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def make_keys(directory: Path, *silos: str) -> Path:
    """``fedtrain keys init DIRECTORY --silo S ...`` for 127.0.0.1 (CA, server and silo keys)."""
    args = [sys.executable, "-m", "fedtrain.cli.main", "keys", "init", str(directory)]
    for s in silos:
        args += ["--silo", s]
    subprocess.run([*args, "--san", "127.0.0.1"], check=True, capture_output=True)
    return directory


def silo_tls_args(keys: Path, silo: str) -> list[str]:
    """``fedtrain client`` options for TLS, node authentication and signing from ``keys``."""
    own = keys / "silos" / silo
    return [
        "--tls-ca",
        str(keys / "ca.crt"),
        "--auth-key",
        str(own / "auth_key"),
        "--signing-key",
        str(own / "sign_key"),
    ]


def chromium() -> str | None:
    """A headless-capable Chromium on PATH (``.ci/run`` installs Debian's ``chromium``)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browse(url: str, screenshot: Path) -> str:
    """Load ``url`` in headless Chromium, let its scripts run (5 s of virtual time), save a
    screenshot; return the rendered DOM."""
    browser = chromium()
    assert browser is not None, "no chromium on PATH"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    common += ["--virtual-time-budget=5000", f"--user-data-dir={screenshot.parent / 'profile'}"]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    subprocess.run(
        [*common, "--window-size=1100,800", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return dom
