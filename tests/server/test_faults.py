"""Bad updates in a simulated run: each kind is rejected with its reason, recorded with its
payload, and the round's aggregate is bitwise the one computed without the faulty silos;
repeat offenders are quarantined."""

from __future__ import annotations

import json

import pytest
import torch

from fedtrain.config import ConfigError, config_from_dict
from fedtrain.simulation.runner import simulate
from fedtrain.storage.runstore import RunStore
from fedtrain.transport.faults import FaultPlan, parse_fault
from tests.conftest import tiny_config_dict

# kind -> what the rejection reason says (signatures are on, so tampered bytes fail there)
BAD = {
    "nan": "NaN",
    "inf": "NaN or infinite",
    "wrong_shape": "shape",
    "wrong_dtype": "dtype float64",
    "wrong_keys": "names differ",
    "truncate": "truncated",
    "corrupt": "signature does not verify",
    "oversize": "max_payload_bytes",
    "bad_signature": "signature does not verify",
    "unsigned": "unsigned payload",
    "replay": "is for round 1, expected 2",
    "impersonate": "signature does not verify",  # another silo's signed payload
    "duplicate": "duplicate",
}
HONEST = 2


def _cfg(silos: int, inject: list[str], rounds: int = 2, **extra: dict) -> dict:
    return tiny_config_dict(
        run={"rounds": rounds, "eval_batches": 2},
        data={"silos": silos, "max_chars": 300_000},
        train={"inner_steps": 2, "warmup_steps": 1, "batch_size": 2, "seq_len": 16, "threads": 1},
        transport={"sign_updates": True},
        simulation={"profiles": [{"count": silos, "step_time_s": 0.01}]},
        storage={"checkpoint_every": 100, "cache_bytes": 0},
        faults={"inject": inject},
        **extra,
    )


def _events(run, kind):
    rows = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in rows if e["event"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Round 2 of one run: two honest silos plus one silo per bad kind; and the same run with
    every faulty reply dropped instead (the duplicating silo's first reply is honest)."""
    root = tmp_path_factory.mktemp("faults")
    bad = {f"silo{HONEST + i}": kind for i, kind in enumerate(BAD)}
    silos = HONEST + len(bad)
    faulty = _cfg(silos, [f"{k}@{s}:2" for s, k in bad.items()])
    baseline = _cfg(silos, [f"drop@{s}:2" for s, k in bad.items() if k != "duplicate"])
    out = {}
    for name, cfg in (("faulty", faulty), ("baseline", baseline)):
        simulate(config_from_dict(cfg), root / name, quiet=True)
        out[name] = root / name
    out["bad"] = bad
    return out


def _round_aggregate(run):
    store = RunStore(run)
    state = store.latest_state(require_silos=False)
    assert state.round == 2
    return store.get_tensors(state.state["aggregate_blob"])[0]


def test_every_bad_kind_is_rejected_with_its_reason(runs):
    rejected = {e["silo"]: e["reason"] for e in _events(runs["faulty"], "rejected")}
    for silo, kind in runs["bad"].items():
        assert silo in rejected, f"{kind} was not rejected"
        assert BAD[kind] in rejected[silo], (kind, rejected[silo])
    assert all(e["round"] == 2 for e in _events(runs["faulty"], "rejected"))
    rows = [json.loads(x) for x in (runs["faulty"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected"] for r in rows] == [0, len(BAD)]
    assert rows[1]["silos"] == HONEST + 1  # the honest ones and the duplicator's first reply


def test_aggregate_equals_the_one_without_the_bad_updates(runs):
    got, want = _round_aggregate(runs["faulty"]), _round_aggregate(runs["baseline"])
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    s = json.loads((runs["faulty"] / "summary.json").read_text())
    b = json.loads((runs["baseline"] / "summary.json").read_text())
    assert s["final_eval_loss"] == b["final_eval_loss"]


def test_rejected_payloads_are_kept_for_debugging(runs):
    store = RunStore(runs["faulty"])
    records = {u["silo"]: u for u in store.index.updates(rnd=2) if not u["valid"]}
    assert "silo2" in records and records["silo2"]["reason"]
    dup = next(s for s, k in runs["bad"].items() if k == "duplicate")
    assert f"{dup}#2" in records  # the repeat is recorded beside the counted first reply
    for silo, rec in records.items():
        assert store.blobs.get(rec["blob"])  # the exact bytes received, for debugging
        assert rec["bytes"] > 0, silo


def test_repeat_offender_is_quarantined_and_rounds_go_on(tmp_path):
    cfg = _cfg(3, ["nan@silo1:*"], rounds=4, reliability={"quarantine_after": 2})
    summary = simulate(config_from_dict(cfg), tmp_path / "q", quiet=True)
    assert summary["rounds"] == 4 and summary["rounds_failed"] == 0
    assert summary["strikes"] == {"silo1": 2}
    assert summary["quarantined"] == {"silo1": 2}
    (q,) = _events(tmp_path / "q", "quarantined")
    assert q["silo"] == "silo1" and q["round"] == 2
    # after quarantine it gets no work: no reply, no rejection, no straggler entry
    later = [e for e in _events(tmp_path / "q", "rejected") if e["round"] > 2]
    assert not later
    rows = [json.loads(x) for x in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    assert [r["silos"] for r in rows] == [2, 2, 2, 2]
    assert [r["quarantined"] for r in rows] == [0, 1, 1, 1]


def test_random_faults_are_seeded_and_exclusive():
    plan = FaultPlan(drop_rate=0.1, corrupt_rate=0.05, seed=3)
    again = FaultPlan(drop_rate=0.1, corrupt_rate=0.05, seed=3)
    cells = [(f"silo{i}", r) for i in range(64) for r in range(1, 21)]
    picks = [[f.kind for f in plan.at(s, r)] for s, r in cells]
    assert picks == [[f.kind for f in again.at(s, r)] for s, r in cells]
    assert all(len(p) <= 1 for p in picks)
    drops = sum(p == ["drop"] for p in picks) / len(picks)
    corrupt = sum(p == ["corrupt"] for p in picks) / len(picks)
    assert 0.08 < drops < 0.12 and 0.03 < corrupt < 0.07


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nan@silo1", "KIND@SILO:ROUND"),
        ("melt@silo1:2", "unknown kind 'melt'"),
        ("nan@silo1:0", "ROUND must be"),
        ("delay@silo1:2=-1", "> 0 for delay"),
        ("replay@silo1:1", "previous round"),
    ],
)
def test_bad_fault_specs_are_refused(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_fault(spec)


def test_fault_config_names_the_entry():
    with pytest.raises(ConfigError, match="faults.inject"):
        config_from_dict(tiny_config_dict(faults={"inject": ["nan@silo7:1"]}))
    with pytest.raises(ConfigError, match="faults.drop_rate"):
        config_from_dict(tiny_config_dict(faults={"drop_rate": 1.5}))
    with pytest.raises(ConfigError, match="reliability.norm_action"):
        config_from_dict(tiny_config_dict(reliability={"norm_action": "ignore"}))
