"""What a silo operator sees, on a real TLS deployment (127.0.0.1, node authentication on):
`fedtrain client` prints connected / joined / one line per round / finished and exits 0 when
the run ends; a silo SIGKILLed (its whole process group) after round 1 and started again with
the same work dir rejoins under its same Flower node id (its previous SuperNode still counted
online: the activation is retried) and trains again in a later round. The coordinator serves
its status page (--status-port), loaded mid-run in headless Chromium. One tiny run serves all.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Any

import pytest

from fedtrain.runtime.children import pids_matching as pids_with
from tests.deploy.helpers import (
    Proc,
    browse,
    chromium,
    events,
    make_keys,
    metrics,
    silo_tls_args,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow

ROUNDS = 8
STEPS = 5


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("operator")
    keys = make_keys(root / "keys", "silo0", "silo1")
    # A dead silo holds each round up to its timeout: room for the restarted one to come back.
    cfg = tiny_config(root / "run.toml", "operator", rounds=ROUNDS, steps=STEPS, timeout=15)
    run = root / "run"
    started: list[Proc] = []
    server = Proc(
        ["server", "--config", str(cfg), "--run-dir", str(run), "--address", "127.0.0.1:0"]
        + ["--tls-dir", str(keys), "--join-timeout", "120", "--status-port", "0"],
        root / "server.log",
    )
    started.append(server)

    def client(silo: str, log: str) -> Proc:
        args = ["client", "--silo", silo, "--server", address, "--work-dir", str(root / silo)]
        p = Proc([*args, "--threads", "1", *silo_tls_args(keys, silo)], root / log)
        started.append(p)
        return p

    try:
        wait_for(lambda: (run / "address").exists(), 60, "the coordinator to listen")
        address = (run / "address").read_text().strip()
        silo0 = client("silo0", "silo0.log")
        silo1 = client("silo1", "silo1.log")
        wait_for(lambda: any(m["round"] == 1 for m in metrics(run)), 180, "round 1 to commit")
        page = _status_page(server, root)
        silo1.crash()
        restarted = client("silo1", "silo1-restarted.log")
        assert server.p.wait(300) == 0, server.text()[-3000:]
        yield {
            "root": root,
            "run": run,
            "server": server,
            "silo0": silo0,
            "restarted": restarted,
            "silo0_rc": silo0.p.wait(60),
            "restarted_rc": restarted.p.wait(60),
            "page": page,
        }
    finally:
        for p in reversed(started):
            p.stop()
        assert not pids_with(str(root)), "processes of the deployment were left running"


def _status_page(server: Proc, root: Any) -> dict[str, Any]:
    """The status page while the run goes on: its JSON, and (where Chromium is installed) the
    page as a browser renders it, with a screenshot."""
    found = re.search(r"status page (http://127\.0\.0\.1:\d+/)", server.text())
    assert found, server.text()[-2000:]
    url = found.group(1)
    with urllib.request.urlopen(url + "status.json", timeout=30) as r:
        status = json.loads(r.read())
    page = {"url": url, "json": status, "dom": None, "screenshot": root / "status.png"}
    if chromium() is not None:
        page["dom"] = browse(url, page["screenshot"])
    return page


def _lines(p: Proc) -> list[str]:
    return [x for x in p.text().splitlines() if x.startswith("fedtrain client: ")]


def test_operator_sees_join_rounds_and_the_end(deployment):
    silo0: Proc = deployment["silo0"]
    out = "\n".join(_lines(silo0))
    assert deployment["silo0_rc"] == 0, silo0.text()[-3000:]
    assert re.search(r"connected to the coordinator 127\.0\.0\.1:\d+ \(node \d+\)", out), out
    assert re.search(r"joined run \S+: model tiny \([\d,]+ parameters\), codec fp32", out), out
    trained = re.findall(
        rf"round (\d+) trained: {STEPS} steps, loss \d+\.\d{{4}}, [\d.]+ \w?B up / "
        r"[\d.]+ \w?B down, [\d.]+s",
        out,
    )
    assert [int(r) for r in trained] == list(range(1, ROUNDS + 1)), out
    assert re.search(r"run \S+ finished \(global version \d+\)", out), out
    daemon_log = (deployment["root"] / "silo0" / "logs" / "daemon.log").read_text()
    assert "SignalException" not in daemon_log


def test_restarted_silo_rejoins_and_trains_again(deployment):
    restarted: Proc = deployment["restarted"]
    out = "\n".join(_lines(restarted))
    assert deployment["restarted_rc"] == 0, restarted.text()[-3000:]
    assert re.search(r"rejoined run \S+ \(resumed at round 1\)", out), out
    assert "hello first" not in deployment["server"].text()
    again = [
        e["round"]
        for e in events(deployment["run"], "silo_report")
        if e["silo"] == "silo1" and e["round"] > 1
    ]
    assert again, "the restarted silo never trained again"
    assert "run " in out and "finished" in out


def test_status_page_shows_the_round_and_silos_in_a_browser(deployment):
    page = deployment["page"]
    status = page["json"]
    assert status["state"] == "running" and status["round"] >= 1
    assert [s["silo"] for s in status["silos"]] == ["silo0", "silo1"]
    assert all(s["last_round"] >= 1 and s["bytes_up"] > 0 for s in status["silos"])
    if page["dom"] is None:
        assert not os.environ.get("CI"), "CI installs chromium (.ci/run)"
        pytest.skip("no chromium on this machine: the browser half is checked in CI")
    dom = page["dom"]
    shown = re.search(r'id="round">(\d+)', dom)
    assert shown and int(shown.group(1)) >= 1, dom[-3000:]
    assert 'data-silo="silo0"' in dom and 'data-silo="silo1"' in dom
    assert 'data-loaded="1"' in dom and "<polyline" in dom  # the charts were drawn
    assert page["screenshot"].stat().st_size > 10_000
