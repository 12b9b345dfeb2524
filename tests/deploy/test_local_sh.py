"""``examples/deploy/local.sh`` from a fresh directory, as a new user runs it: keys, two TLS
silos started BEFORE the coordinator (one sharded over 2 processes), then the coordinator; the
same script with a tiny model and 2 rounds (``FEDTRAIN_SET``) on a free port. It finishes first
time: the silos' keys are registered before the public port opens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedtrain.runtime.children import free_port
from fedtrain.runtime.children import pids_matching as pids_with
from tests.deploy.helpers import LOCAL_SH_TINY, fedtrain_on_path, metrics

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "deploy" / "local.sh"


@pytest.mark.timeout(300)
def test_local_sh_finishes_first_time_from_a_fresh_directory(tmp_path):
    work = tmp_path / "fresh"
    env = {
        **os.environ,
        "PATH": fedtrain_on_path(tmp_path / "bin"),
        "FEDTRAIN_PORT": str(free_port()),
        "FEDTRAIN_SET": LOCAL_SH_TINY,
    }
    assert shutil.which("bash")
    r = subprocess.run(
        ["bash", str(SCRIPT), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    silo_logs = "".join((work / f"silo{i}.log").read_text()[-1500:] for i in (0, 1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + silo_logs
    assert "registered silo keys: silo0, silo1" in r.stdout
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2
    rows = metrics(work / "run")
    assert [m["round"] for m in rows] == [1, 2]
    assert all(m["silos"] == 2 for m in rows), rows  # both silos in every round
    assert "not registered" not in silo_logs
    assert not pids_with(str(work)), "the script left processes of the deployment running"
