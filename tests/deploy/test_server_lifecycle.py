"""``fedtrain server`` starting, refusing and failing on real processes (127.0.0.1):

1. A second ``fedtrain server`` on a live run directory exits non-zero naming the first's pid
   and lock, and the first keeps running and finishes its run.
2. A run whose silos never join ends the command non-zero with the reason on the terminal and
   in ``logs/run.log``; a restart in the same directory echoes only its own log.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedtrain.runtime.children import pids_matching as pids_with
from tests.deploy.helpers import Proc, events, tiny_config, wait_for

pytestmark = pytest.mark.slow


def _server(root: Path, cfg: Path, run: Path, log: str, *extra: str) -> Proc:
    args = ["server", "--config", str(cfg), "--run-dir", str(run), "--address", "127.0.0.1:0"]
    return Proc([*args, *extra], root / log)


@pytest.fixture
def root(tmp_path):
    procs: list[Proc] = []
    yield tmp_path, procs
    for p in reversed(procs):
        p.stop()
    assert not pids_with(str(tmp_path)), "processes of the deployment were left running"


def test_second_server_on_a_live_run_dir_is_refused(root):
    tmp, procs = root
    cfg = tiny_config(tmp / "one.toml", "lock", rounds=1, silos=1, steps=5)
    run = tmp / "run"
    first = _server(tmp, cfg, run, "first.log", "--join-timeout", "120")
    procs.append(first)
    wait_for(lambda: (run / "address").exists(), 90, "the coordinator to listen")
    second = _server(tmp, cfg, run, "second.log")
    procs.append(second)
    assert second.p.wait(60) != 0
    out = second.text()
    assert f"pid {first.p.pid}" in out and str(run / "server.lock") in out, out
    assert "stopped" not in out and "Traceback" not in out
    assert first.alive(), first.text()[-2000:]
    address = (run / "address").read_text().strip()
    silo = Proc(
        ["client", "--silo", "silo0", "--server", address, "--work-dir", str(tmp / "silo0")],
        tmp / "silo0.log",
    )
    procs.append(silo)
    assert first.p.wait(240) == 0, first.text()[-3000:]
    assert json.loads((run / "summary.json").read_text())["rounds"] == 1


def _run_ids(text: str) -> list[str]:
    return re.findall(r"Successfully started run (\d+)", text)


def test_join_timeout_reason_is_printed_and_logged(root):
    tmp, procs = root
    cfg = tiny_config(tmp / "alone.toml", "alone", rounds=1, silos=1)
    run = tmp / "run"
    texts = []
    for n in (1, 2):  # the second start resumes the same run dir
        p = _server(tmp, cfg, run, f"start{n}.log", "--join-timeout", "3")
        procs.append(p)
        assert p.p.wait(150) == 1, p.text()[-3000:]
        texts.append(p.text())
        failed = [x for x in p.text().splitlines() if "fedtrain server: the run failed: " in x]
        assert len(failed) == 1 and "silo0" in failed[0] and "did not join" in failed[0]
        assert "without a summary" not in p.text()
    log = (run / "logs" / "run.log").read_text()
    assert log.count(failed[0]) == 2
    assert [e["reason"] for e in events(run, "run_failed")] == [failed[0].split(": ", 2)[2]] * 2
    first, second = (_run_ids(t) for t in texts)
    assert len(first) == 1 and len(second) == 1 and first != second
    assert first[0] not in texts[1]  # the restart did not re-print the first start's log
