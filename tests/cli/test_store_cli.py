"""`fedtrain store ls|show|query` on a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.cli.helpers import cli, simulate_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "run"
    return simulate_tiny(out, "data.silos=3", "run.rounds=3", "train.inner_steps=4")


def test_ls_lists_committed_rounds(run_dir):
    r = cli("store", "ls", str(run_dir), "--json")
    rows = json.loads(r.stdout)
    assert [(x["round"], x["status"]) for x in rows] == [
        (1, "committed"),
        (2, "committed"),
        (3, "committed"),
    ]
    assert all(x["tokens"] > 0 and x["bytes_up"] > 0 for x in rows)
    table = cli("store", "ls", str(run_dir))
    assert table.returncode == 0 and "committed" in table.stdout


def test_show_lists_each_silo_update(run_dir):
    data = json.loads(cli("store", "show", str(run_dir), "--round", "2", "--json").stdout)
    assert [u["silo"] for u in data["updates"]] == ["silo0", "silo1", "silo2"]
    assert all(u["valid"] == 1 and u["codec"] == "fp32" for u in data["updates"])
    assert any(e["event"] == "reply" for e in data["events"])


def test_query_workloads(run_dir, tmp_path):
    sim = json.loads(cli("store", "query", str(run_dir), "similarity", "--json").stdout)
    assert set(sim) == {"silo0", "silo1", "silo2"} and all(0 < v <= 1 for v in sim.values())
    anomalies = json.loads(
        cli("store", "query", str(run_dir), "anomalies", "-r", "2", "--json").stdout
    )
    assert set(anomalies["silos"]) == set(sim) and "flagged" in anomalies
    # Round 1's updates left the retention window (storage.keep_updates = 2 of 3 rounds).
    gone = cli("store", "query", str(run_dir), "anomalies", "-r", "1", "--json")
    assert gone.returncode == 2 and "keep_updates" in gone.stderr, gone.stderr
    loo = json.loads(
        cli("store", "query", str(run_dir), "contribution", "--method", "loo", "--json").stdout
    )
    assert set(loo) == set(sim)
    out = tmp_path / "latest.safetensors"
    r = cli("store", "query", str(run_dir), "latest_model", "--out", str(out))
    assert r.returncode == 0
    latest, final = load_file(str(out)), load_file(str(run_dir / "model.safetensors"))
    assert all((latest[k] == final[k]).all() for k in final)


def test_bad_queries_are_one_clear_line(run_dir, tmp_path):
    r = cli("store", "query", str(run_dir), "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown workload 'nope'")
    r = cli("store", "ls", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr
    r = cli("store", "query", str(run_dir), "similarity", "--round", "7")
    assert r.returncode == 2 and "round 7 is not committed" in r.stderr
