"""Faults in a real deployment on 127.0.0.1: `fedtrain server` and two `fedtrain client` silos.

silo0 misbehaves through ``FEDTRAIN_FAULTS`` (:data:`FAULTS`): it drops its round-1 reply (held
past the round's deadline), sends a NaN update, validly made, in round 2, silo1's payload as its
own in round 3 (the silos share a directory, ``FEDTRAIN_FAULTS_SHARE``, as colluding silos
would), and one flipped body byte in round 7 — its third strike, so it is quarantined and gets
no work in round 8. silo1 reaches the coordinator through a loopback TCP proxy the test cuts
once round 3 has committed and restores once round 4 has. Round 4 therefore goes on with silo0
alone, and silo1's SuperNode, retrying (Flower's HTTP fleet client retries connection errors
without limit, backing off to 20 s), comes back by itself. silo0's faulty rounds lie where
silo1 is connected on purpose: with both out a round has no valid update and fails, and this
test wants every round committed exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedtrain.runtime.children import free_port
from fedtrain.runtime.children import pids_matching as pids_with
from tests.deploy.helpers import Proc, events, metrics, tiny_config, wait_for
from tests.deploy.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

ROUNDS = 8
FAULTS = "drop@silo0:1,nan@silo0:2,impersonate@silo0:3,corrupt@silo0:7"
CUT_AFTER = 3
"""silo1's link is cut once this round commits, and restored once the next one has."""


def _committed(run: Path, rnd: int) -> bool:
    return any(m["round"] >= rnd for m in metrics(run))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("faults")
    port = free_port()
    proxy = TcpProxy("127.0.0.1", port)
    started: list[Proc] = []

    def client(silo: str, server_port: int, env: dict[str, str] | None = None) -> Proc:
        args = ["client", "--silo", silo, "--server", f"127.0.0.1:{server_port}"]
        args += ["--nproc", "1", "--work-dir", str(root / silo), "--threads", "1"]
        p = Proc(args, root / f"{silo}.log", env=env)
        started.append(p)
        return p

    try:
        cfg = tiny_config(root / "faults.toml", "faults", rounds=ROUNDS, steps=5, timeout=20)
        run = root / "run"
        server = Proc(
            ["server", "--config", str(cfg), "--run-dir", str(run)]
            + ["--address", f"127.0.0.1:{port}", "--join-timeout", "120"],
            root / "server.log",
        )
        started.append(server)
        wait_for(lambda: (run / "address").exists(), 60, "the coordinator to listen")
        t0 = time.monotonic()
        share = {"FEDTRAIN_FAULTS_SHARE": str(root / "share")}
        client("silo0", port, env={"FEDTRAIN_FAULTS": FAULTS, **share})
        client("silo1", proxy.port, env=share)
        wait_for(lambda: _committed(run, CUT_AFTER), 180, f"round {CUT_AFTER} to commit")
        proxy.cut()
        cut_at = time.monotonic()
        wait_for(lambda: _committed(run, CUT_AFTER + 1), 120, f"round {CUT_AFTER + 1} to commit")
        proxy.restore()
        restored_at = time.monotonic()
        server.p.wait(240)
        ended_at = time.monotonic()
        assert server.p.returncode == 0, server.text()[-3000:]
        yield {
            "root": root,
            "run": run,
            "proxy": proxy,
            "cut_s": restored_at - cut_at,
            "run_s": ended_at - t0,
        }
    finally:
        for p in reversed(started):
            p.stop()
        proxy.close()
        assert not pids_with(str(root)), "processes of the deployment were left running"
        for port_file in root.glob("silo*/supernode.port"):  # Flower's ClientApps included
            assert not pids_with(f"--runtime-api-address 127.0.0.1:{port_file.read_text()} ")


def test_every_round_commits_once(deployment):
    run = deployment["run"]
    assert [m["round"] for m in metrics(run)] == list(range(1, ROUNDS + 1))
    s = json.loads((run / "summary.json").read_text())
    assert s["rounds"] == ROUNDS and s["rounds_failed"] == 0
    assert s["final_eval_loss"] < s["initial_eval_loss"]


def test_falsified_replies_are_rejected_with_the_reason(deployment):
    run = deployment["run"]
    rejected = {(e["round"], e["silo"]): e["reason"] for e in events(run, "rejected")}
    assert set(rejected) == {(2, "silo0"), (3, "silo0"), (7, "silo0")}, rejected
    assert "NaN" in rejected[2, "silo0"]
    assert "payload was sent by 'silo1', expected 'silo0'" in rejected[3, "silo0"]
    assert "checksum" in rejected[7, "silo0"] or "signature" in rejected[7, "silo0"]
    rows = {m["round"]: m for m in metrics(run)}
    for rnd in (2, 3, 7):
        assert rows[rnd]["silos"] == 1 and rows[rnd]["rejected"] == 1  # silo1's update alone
    # the faults came from the environment through the launcher and torchrun to the daemon
    daemon_log = (deployment["root"] / "silo0" / "logs" / "daemon.log").read_text()
    for fault in FAULTS.split(",")[1:]:
        assert f"injected fault {fault}: round {fault[-1]} reply replaced" in daemon_log
    assert (
        "injected fault" not in (deployment["root"] / "silo1" / "logs" / "daemon.log").read_text()
    )


def test_dropped_reply_never_counts_in_its_round(deployment):
    run = deployment["run"]
    daemon_log = (deployment["root"] / "silo0" / "logs" / "daemon.log").read_text()
    assert "injected fault drop@silo0:1: holding the reply" in daemon_log
    late = {(e["round"], e["silo"]): e for e in events(run, "straggler")}
    assert late[1, "silo0"]["timeout_s"] == 20.0  # the round waited out its deadline for it
    assert metrics(run)[0]["silos"] == 1
    assert (1, "silo0") not in {(e["round"], e["silo"]) for e in events(run, "silo_report")}
    # ... and silo0 was back in round 2 (its NaN reached the validator), with full weights
    assert {(e["round"], e["silo"]) for e in events(run, "resync")} >= {(2, "silo0")}


def test_third_strike_quarantines_the_silo(deployment):
    run = deployment["run"]
    quarantined = [(e["round"], e["silo"], e["strikes"]) for e in events(run, "quarantined")]
    assert quarantined == [(7, "silo0", 3)]
    s = json.loads((run / "summary.json").read_text())
    assert s["strikes"] == {"silo0": 3} and s["quarantined"] == {"silo0": 7}
    last = metrics(run)[-1]
    assert last["round"] == ROUNDS and last["silos"] == 1  # no work for silo0 any more
    reports = {(e["round"], e["silo"]) for e in events(run, "silo_report")}
    assert (ROUNDS, "silo1") in reports and (ROUNDS, "silo0") not in reports


def test_cut_silo_is_left_out_then_comes_back(deployment):
    run, proxy = deployment["run"], deployment["proxy"]
    facts = (
        f"cut {deployment['cut_s']:.1f}s; proxy: {proxy.connections} connections, "
        f"{proxy.aborted} aborted and {proxy.refused} reset while cut, "
        f"{proxy.bytes_up / 1e6:.1f} MB up, {proxy.bytes_down / 1e6:.1f} MB down; "
        f"run {deployment['run_s']:.0f}s"
    )
    print(facts)
    assert proxy.aborted + proxy.refused > 0, facts  # the cut did break silo1's traffic
    rows = {m["round"]: m for m in metrics(run)}
    cut_round = CUT_AFTER + 1
    assert rows[cut_round]["silos"] == 1  # went on without silo1
    reports = {(e["round"], e["silo"]) for e in events(run, "silo_report")}
    assert (cut_round, "silo1") not in reports
    assert {(r, "silo1") for r in range(1, cut_round)} <= reports
    back = [r for r in range(cut_round + 1, ROUNDS + 1) if rows[r]["silos"] == 2]
    assert back, f"silo1 never contributed again after the cut ({facts}): {rows}"
    assert any(s == "silo1" and r > cut_round for r, s in reports)


def test_deployed_silo_refuses_a_simulation_only_fault(tmp_path):
    """A kind a deployed silo cannot inject stops `fedtrain client` with the spec named."""
    env = {**os.environ, "FEDTRAIN_FAULTS": "nan@silo0:2,duplicate@silo1:3"}
    out = subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", "client", "--silo", "silo0"]
        + ["--server", "127.0.0.1:9", "--work-dir", str(tmp_path / "w"), "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert out.returncode == 2
    assert "fault 'duplicate@silo1:3': duplicate cannot be injected by a deployed silo" in (
        out.stderr
    )
    assert not pids_with(str(tmp_path))
