"""`fedtrain store ls|show|query` on a real (tiny) run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedtrain.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "run"
    sets = [
        "model.preset=tiny",
        "data.tokenizer=byte",
        "data.silos=3",
        "data.max_chars=300000",
        "run.token_budget=0",
        "run.rounds=3",
        "run.eval_batches=4",
        "train.inner_steps=4",
        "train.batch_size=4",
        "train.seq_len=32",
        "round.min_silos=1",
        "simulation.profiles=[]",
    ]
    r = _cli("simulate", "--quiet", "--run-dir", str(out), *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr
    return out


def test_ls_lists_committed_rounds(run_dir):
    r = _cli("store", "ls", str(run_dir), "--json")
    rows = json.loads(r.stdout)
    assert [(x["round"], x["status"]) for x in rows] == [
        (1, "committed"),
        (2, "committed"),
        (3, "committed"),
    ]
    assert all(x["tokens"] > 0 and x["bytes_up"] > 0 for x in rows)
    table = _cli("store", "ls", str(run_dir))
    assert table.returncode == 0 and "committed" in table.stdout


def test_show_lists_each_silo_update(run_dir):
    data = json.loads(_cli("store", "show", str(run_dir), "--round", "2", "--json").stdout)
    assert [u["silo"] for u in data["updates"]] == ["silo0", "silo1", "silo2"]
    assert all(u["valid"] == 1 and u["codec"] == "fp32" for u in data["updates"])
    assert any(e["event"] == "reply" for e in data["events"])


def test_query_workloads(run_dir, tmp_path):
    sim = json.loads(_cli("store", "query", str(run_dir), "similarity", "--json").stdout)
    assert set(sim) == {"silo0", "silo1", "silo2"} and all(0 < v <= 1 for v in sim.values())
    anomalies = json.loads(
        _cli("store", "query", str(run_dir), "anomalies", "-r", "2", "--json").stdout
    )
    assert set(anomalies["silos"]) == set(sim) and "flagged" in anomalies
    # Round 1's updates left the retention window (storage.keep_updates = 2 of 3 rounds).
    gone = _cli("store", "query", str(run_dir), "anomalies", "-r", "1", "--json")
    assert gone.returncode == 2 and "keep_updates" in gone.stderr, gone.stderr
    loo = json.loads(
        _cli("store", "query", str(run_dir), "contribution", "--method", "loo", "--json").stdout
    )
    assert set(loo) == set(sim)
    out = tmp_path / "latest.safetensors"
    r = _cli("store", "query", str(run_dir), "latest_model", "--out", str(out))
    assert r.returncode == 0
    latest, final = load_file(str(out)), load_file(str(run_dir / "model.safetensors"))
    assert all((latest[k] == final[k]).all() for k in final)


def test_bad_queries_are_one_clear_line(run_dir, tmp_path):
    r = _cli("store", "query", str(run_dir), "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown workload 'nope'")
    r = _cli("store", "ls", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr
    r = _cli("store", "query", str(run_dir), "similarity", "--round", "7")
    assert r.returncode == 2 and "round 7 is not committed" in r.stderr
