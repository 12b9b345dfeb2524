"""Crash and resume: SIGKILL at each phase of the commit protocol (and at random moments), then
``--resume`` must end with final weights bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtrain.storage.faults import PHASES
from fedtrain.storage.runstore import RunStore

pytestmark = pytest.mark.slow

# int4 + error feedback, so residuals (committed and awaiting acknowledgement) must survive too.
OVERRIDES = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=300000",
    "run.token_budget=0",
    "run.rounds=4",
    "run.eval_batches=4",
    "train.inner_steps=4",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "round.min_silos=1",
    "simulation.profiles=[]",
    "transport.codec=int4",
    "transport.error_feedback=true",
    "transport.stochastic_rounding=true",
    "train.threads=1",
]


def _cmd(run_dir: Path, resume: bool = False) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "fedtrain.cli.main",
        "simulate",
        "--quiet",
        "--run-dir",
        str(run_dir),
    ]
    if resume:
        return [*args, "--resume"]
    for o in OVERRIDES:
        args += ["--set", o]
    return args


def _run(run_dir: Path, resume: bool = False, kill_at: str | None = None):
    env = dict(os.environ)
    env.pop("FEDTRAIN_KILL_AT", None)
    if kill_at:
        env["FEDTRAIN_KILL_AT"] = kill_at
    return subprocess.run(
        _cmd(run_dir, resume), capture_output=True, text=True, env=env, timeout=180
    )


def _weights(run_dir: Path):
    return load_file(str(run_dir / "model.safetensors"))


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = _weights(run_dir), _weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # every round exactly once
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in rows] == [r["eval_loss"] for r in ref]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.perf_counter()
    r = _run(out)
    assert r.returncode == 0, r.stderr
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_each_commit_phase_then_resume_is_bitwise_identical(phase, reference, tmp_path):
    run_dir = tmp_path / "run"
    # Round 3 is the first whose commit deletes something (round 1's updates leave the window).
    killed = _run(run_dir, kill_at=f"{phase}@{3 if phase == 'pruned_index' else 2}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "summary.json").exists()
    resumed = _run(run_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run_dir, reference[0])
    events = [json.loads(x)["event"] for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "resume" in events


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_a_random_moment_then_resume(seed, reference, tmp_path):
    ref_dir, duration = reference
    run_dir = tmp_path / "run"
    delay = random.Random(seed).uniform(0.3, 1.0) * duration
    proc = subprocess.Popen(_cmd(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    if (run_dir / "summary.json").exists():
        _assert_same_run(run_dir, ref_dir)  # finished before the kill landed
        return
    if not (run_dir / "index.sqlite").exists() or not RunStore(run_dir).index.committed_rounds():
        # Killed before the first commit: nothing to resume; a fresh start is the recovery.
        r = _run(tmp_path / "fresh")
        assert r.returncode == 0
        _assert_same_run(tmp_path / "fresh", ref_dir)
        return
    resumed = _run(run_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run_dir, ref_dir)


def test_corrupt_blob_is_detected_and_resume_falls_back_to_an_older_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    assert _run(run_dir, kill_at="published@3").returncode == -signal.SIGKILL
    store = RunStore(run_dir)
    blob = store.index.round_state(3)["global_blob"]
    path = Path(store.blobs.path(blob))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from fedtrain.storage.blobstore import BlobCorrupted

    with pytest.raises(BlobCorrupted, match="corrupted"):
        store.blobs.get(blob)
    store.index.close()
    resumed = _run(run_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run_dir, reference[0])
    store = RunStore(run_dir)
    corrupt = [e for e in store.index.events("checkpoint_corrupt")]
    assert corrupt and corrupt[0]["round"] == 3 and "BlobCorrupted" in corrupt[0]["reason"]


def test_resume_refusals_are_one_clear_line(reference, tmp_path):
    done = _run(reference[0], resume=True)
    assert done.returncode == 2 and "already finished" in done.stderr
    empty = _run(tmp_path / "nothing", resume=True)
    assert empty.returncode == 2 and "holds no run" in empty.stderr
    assert "Traceback" not in done.stderr + empty.stderr
