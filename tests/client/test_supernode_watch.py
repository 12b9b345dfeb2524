"""The silo launcher's watch loop against a fake ``flower-supernode`` (a script that plays one
of Flower's behaviours per start): refused activations are retried and said, repeated HTTP 401
restarts the SuperNode, the daemon's events become one line each, ``finished`` ends with 0 and
``refused`` with 3; a failed daemon is reported with its own reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedtrain.client.events import ERROR_FILE, EventLog, EventTail, describe, failure_reason
from fedtrain.client.supernode import Watch
from fedtrain.runtime.children import Children

FAKE = """#!{python}
import pathlib, sys, time
state = pathlib.Path(sys.argv[1])
n = int(state.read_text()) if state.exists() else 0
state.write_text(str(n + 1))
plan = sys.argv[2].split(",")
step = plan[min(n, len(plan) - 1)]
print("INFO :      Starting Flower SuperNode", flush=True)
if step == "refuse":
    print("ERROR :     Exit Code: 305\\nFailed to initialize the connection to the SuperLink.")
    print("[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
if step == "silent":  # never reaches a SuperLink
    while True:
        time.sleep(0.2)
if step == "401":
    print("INFO :      SuperNode ID: 7", flush=True)
    while True:
        print('HTTP 401: {{"detail":"Invalid SuperNode authentication"}}', flush=True)
        time.sleep(0.2)
print(f"INFO :      SuperNode ID: {{40 + n}}", flush=True)
while True:
    print("INFO :      Sent successfully", flush=True)
    time.sleep(0.3)
"""


def _watch(tmp_path: Path, plan: str, stay: bool = False) -> tuple[Watch, EventLog]:
    script = tmp_path / "flower-supernode"
    script.write_text(FAKE.format(python=sys.executable))
    script.chmod(0o755)
    children = Children(tmp_path / "logs")
    events = tmp_path / "events.jsonl"
    node = [str(script), str(tmp_path / "starts"), plan]
    watch = Watch(
        children,
        node,
        server="127.0.0.1:1",
        work_dir=tmp_path,
        runtime_port=1,
        tls=True,
        events=EventTail(events),
        stay=stay,
    )
    return watch, EventLog(events)


def _run(
    watch: Watch, log: EventLog, after_connect: list[tuple[str, dict]], starts: int = 1
) -> int:
    """Run the watch; once connected (in the ``starts``-th SuperNode start), the daemon
    'records' ``after_connect``."""
    import threading

    def connected() -> bool:
        path = watch.log.parent.parent / "starts"
        return watch.connected and path.exists() and int(path.read_text()) >= starts

    def daemon() -> None:
        import time

        deadline = time.monotonic() + 60
        while not connected() and time.monotonic() < deadline:
            time.sleep(0.1)
        for kind, fields in after_connect:
            log.emit(kind, **fields)

    t = threading.Thread(target=daemon, daemon=True)
    t.start()
    try:
        return watch.run()
    finally:
        watch.children.stop()
        t.join(5)


def _starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


def test_refused_activation_is_retried_with_backoff(tmp_path, capsys):
    watch, log = _watch(tmp_path, "refuse,refuse,up")
    rc = _run(watch, log, [("finished", {"run_id": "r", "version": 3})])
    out = capsys.readouterr()
    assert rc == 0, out
    retries = [x for x in out.out.splitlines() if "did not accept this silo's node key" in x]
    assert len(retries) == 2
    assert "retrying in 1s" in retries[0] and "retrying in 2s" in retries[1]
    assert "giving up 150s after the first refusal" in retries[0]
    assert "connected to the coordinator 127.0.0.1:1 (node 42)" in out.out
    assert "run r finished (global version 3)" in out.out
    assert "refused" not in out.err and _starts(tmp_path) == 3


def test_activation_refused_for_good_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDTRAIN_ACTIVATION_RETRY_S", "1.5")
    watch, log = _watch(tmp_path, "refuse")
    assert _run(watch, log, []) == 3
    out = capsys.readouterr()
    assert "giving up 2s after the first refusal" in out.out
    assert "node activation still refused after 2s; giving up" in out.err
    assert "auth-key is not registered" in out.err


def test_repeated_401_restarts_the_supernode(tmp_path, capsys):
    watch, log = _watch(tmp_path, "401,up")
    rc = _run(watch, log, [("finished", {"run_id": "r", "version": 1})], starts=2)
    out = capsys.readouterr()
    assert rc == 0, out
    assert "does not know this silo's node (HTTP 401" in out.out
    assert "restarting the SuperNode in 1s" in out.out
    assert "(node 7)" in out.out and "(node 41)" in out.out and _starts(tmp_path) == 2


def test_events_become_lines_and_refused_exits_3(tmp_path, capsys):
    watch, log = _watch(tmp_path, "up")
    events = [
        ("joined", {"run_id": "r", "preset": "tiny", "params": 123456, "codec": "int8"}),
        ("round", {"round": 1, "steps": 10, "loss": 5.4321, "bytes_up": 2500, "bytes_down": 0,
                   "seconds": 1.26, "missed": []}),
        ("refused", {"run_id": "r", "reason": "silo 'silo9' is not in this run"}),
    ]  # fmt: skip
    assert _run(watch, log, events) == 3
    out = capsys.readouterr()
    assert "fedtrain client: joined run r: model tiny (123,456 parameters), codec int8" in out.out
    assert "round 1 trained: 10 steps, loss 5.4321, 2.5 kB up / 0 B down, 1.3s" in out.out
    assert "left run r: silo 'silo9' is not in this run" in out.err


def test_stay_keeps_serving_after_a_run_finishes(tmp_path, capsys):
    watch, log = _watch(tmp_path, "up", stay=True)
    watch.children.start("daemon", [sys.executable, "-c", "import time; time.sleep(4)"])
    rc = _run(watch, log, [("finished", {"run_id": "r", "version": 2})])
    out = capsys.readouterr()
    assert "run r finished" in out.out  # ...and it went on until the 'daemon' exited
    assert rc == 1 and "the daemon exited with code 0" in out.err


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            {"event": "joined", "run_id": "r", "preset": "mini", "params": 7, "codec": "fp32",
             "resumed_round": 4},
            "rejoined run r (resumed at round 4): model mini (7 parameters), codec fp32",
        ),
        (
            {"event": "round", "round": 5, "steps": 3, "loss": 2.0, "bytes_up": 1_500_000,
             "bytes_down": 12, "seconds": 0.04, "missed": [2, 3, 4]},
            "left out of rounds 2-4; rejoined: round 5 trained: 3 steps, loss 2.0000, "
            "1.5 MB up / 12 B down, 0.0s",
        ),
        ({"event": "round_failed", "round": 2, "reason": "x"}, "round 2 not trained: x"),
        ({"event": "unknown"}, None),
    ],
)  # fmt: skip
def test_describe(event, line):
    assert describe(event) == line


def test_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"event": "old"}\n')
    tail = EventTail(path)
    with path.open("a") as f:
        f.write('{"event": "a"}\n{"event": ')
    assert tail.read() == [{"event": "a"}]
    with path.open("a") as f:
        f.write('"b"}\nnot json\n')
    assert tail.read() == [{"event": "b"}]


def test_failure_reason_prefers_the_daemons_own_line(tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        "fedtrain.data.corpus.CorpusError: --data x.txt: no text found\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "  error_file: <N/A>\n"
    )
    assert failure_reason(tmp_path, log) == (
        "fedtrain.data.corpus.CorpusError: --data x.txt: no text found"
    )
    (tmp_path / ERROR_FILE).write_text("CorpusError: the first rank's reason\n")
    assert failure_reason(tmp_path, log) == "CorpusError: the first rank's reason"
    assert json.dumps(failure_reason(tmp_path / "nowhere", tmp_path / "none.log"))


def test_an_unreachable_coordinator_is_said_while_waiting(tmp_path, capsys, monkeypatch):
    """A wrong --server (here a closed port) or a coordinator not up yet: after a while the
    silo says it cannot reach it and keeps trying (until, here, the daemon is refused)."""
    import threading

    import fedtrain.client.supernode as supernode

    monkeypatch.setattr(supernode, "_UNREACHABLE_AFTER_S", 0.5)
    watch, log = _watch(tmp_path, "silent")
    timer = threading.Timer(3.0, lambda: log.emit("refused", run_id="r", reason="gone"))
    timer.start()
    try:
        assert watch.run() == 3
    finally:
        timer.cancel()
        watch.children.stop()
    out = capsys.readouterr()
    said = [x for x in out.err.splitlines() if "cannot reach the coordinator" in x]
    assert said == [
        "fedtrain client: cannot reach the coordinator at 127.0.0.1:1 (not started yet, or a "
        "wrong --server?); still trying"
    ]
    assert not watch.connected
