"""Round-loop behaviour with a scripted engine: exact arrival times, faults by (silo, round)."""

from __future__ import annotations

import json

import torch

from fedtrain.config import config_from_dict
from fedtrain.models import PRESETS, build_model
from fedtrain.server import Coordinator, Reply
from fedtrain.storage.runstore import RunStore
from fedtrain.strategies import build_strategy
from fedtrain.transport import decode_payload, encode_payload
from tests.conftest import tiny_config_dict


class ScriptedEngine:
    """Silos whose replies are fixed pseudo-gradients with scripted arrival times and faults."""

    def __init__(self, cfg, run_id, arrivals, faults=None):
        self.silos = cfg.silo_names()
        self.run_id = run_id
        self.arrivals = arrivals  # silo -> seconds
        self.faults = faults or {}  # (silo, round) -> "corrupt" | "nan" | "wrong_round"
        self.now = 0.0
        self.received_downlinks: list[bytes | None] = []
        self.params = None

    def delta(self, silo, rnd):
        g = torch.Generator().manual_seed(1000 * rnd + self.silos.index(silo))
        return {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in self.params.items()}

    def join(self, payload):
        return len(payload) * len(self.silos)

    def run_round(self, rnd, work, downlink, deadline_s):
        self.received_downlinks.append(downlink)
        for silo in sorted(work, key=lambda s: self.arrivals[s]):
            fault = self.faults.get((silo, rnd))
            tensors = self.delta(silo, rnd)
            if fault == "nan":
                tensors["norm.weight"] = torch.full_like(tensors["norm.weight"], float("nan"))
            data = encode_payload(
                tensors,
                codec="fp32",
                kind="pseudo_grad",
                run_id=self.run_id,
                round=rnd - 1 if fault == "wrong_round" else rnd,
                sender=silo,
                meta={"tokens": 100, "train_loss": 1.0},
            )
            if fault == "corrupt":
                data = data[:-1] + bytes([data[-1] ^ 1])
            yield Reply(silo=silo, payload=data, arrival_s=self.arrivals[silo])

    def finish(self, downlink):
        self.received_downlinks.append(downlink)
        return len(downlink or b"") * len(self.silos)

    def save_state(self, store, full):
        return {"clock": self.now}

    def restore_state(self, store, state):
        self.now = state["clock"]

    def close_round(self, duration_s):
        self.now += duration_s

    def sim_time_s(self):
        return self.now

    def round_stats(self):
        return {}


def _setup(tmp_path, arrivals, faults=None, **round_cfg):
    cfg = config_from_dict(
        tiny_config_dict(
            data={"silos": 3, "max_chars": 50_000},
            run={"rounds": 1},
            strategy={"name": "fedavg"},
            round={"timeout_s": 10.0, **round_cfg},
        )
    )
    model = build_model(PRESETS["tiny"], 256, 0)
    params = dict(model.named_parameters())
    engine = ScriptedEngine(cfg, "run", arrivals, faults)
    engine.params = params
    run = RunStore(tmp_path)
    coord = Coordinator(
        cfg=cfg,
        run_id="run",
        model=model,
        strategy=build_strategy(cfg, params),
        engine=engine,
        store=run,
        eval_batch=torch.randint(0, 256, (2, 33)),
    )
    start = {n: p.detach().clone() for n, p in params.items()}
    return coord, engine, run, params, start


def _events(run, kind):
    return [e for e in run.dir.read_jsonl(run.dir.events_path) if e["event"] == kind]


def _expected_fedavg(start, engine, silos, rnd=1):
    return {n: start[n] - sum(engine.delta(s, rnd)[n] for s in silos) / len(silos) for n in start}


def _assert_weights(params, expected):
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-6)


def test_straggler_past_deadline_is_excluded_and_logged(tmp_path):
    coord, engine, run, params, start = _setup(
        tmp_path, {"silo0": 1.0, "silo1": 2.5, "silo2": 30.0}
    )
    totals = coord.run()
    assert totals.stragglers == 1 and totals.rounds == 1
    (ev,) = _events(run, "straggler")
    assert ev["silo"] == "silo2" and ev["arrival_s"] == 30.0
    _assert_weights(params, _expected_fedavg(start, engine, ["silo0", "silo1"]))
    row = json.loads(run.dir.metrics_path.read_text().splitlines()[0])
    assert row["round_time_s"] == 10.0  # waited until the deadline for silo2
    assert row["silos"] == 2 and row["stragglers"] == 1


def test_quorum_closes_at_the_kth_arrival(tmp_path):
    coord, engine, run, params, start = _setup(
        tmp_path, {"silo0": 1.0, "silo1": 2.5, "silo2": 8.0}, close_when="quorum", min_silos=2
    )
    coord.run()
    row = json.loads(run.dir.metrics_path.read_text().splitlines()[0])
    assert row["round_time_s"] == 2.5 and row["silos"] == 2
    _assert_weights(params, _expected_fedavg(start, engine, ["silo0", "silo1"]))


def test_bad_updates_are_rejected_with_a_reason_and_do_not_count(tmp_path):
    faults = {("silo0", 1): "corrupt", ("silo1", 1): "nan"}
    coord, engine, run, params, start = _setup(
        tmp_path, {"silo0": 1.0, "silo1": 2.0, "silo2": 3.0}, faults
    )
    coord.run()
    reasons = {e["silo"]: e["reason"] for e in _events(run, "rejected")}
    assert "checksum" in reasons["silo0"]
    assert "NaN" in reasons["silo1"]
    _assert_weights(params, _expected_fedavg(start, engine, ["silo2"]))


def test_replayed_round_is_rejected(tmp_path):
    coord, engine, run, params, start = _setup(
        tmp_path, {"silo0": 1.0, "silo1": 2.0, "silo2": 3.0}, {("silo2", 1): "wrong_round"}
    )
    coord.run()
    (ev,) = _events(run, "rejected")
    assert ev["silo"] == "silo2" and "round 0, expected 1" in ev["reason"]


def test_round_without_quorum_changes_nothing_and_is_recorded(tmp_path):
    faults = {(s, 1): "nan" for s in ("silo0", "silo1")}
    coord, engine, run, params, start = _setup(
        tmp_path, {"silo0": 1.0, "silo1": 2.0, "silo2": 20.0}, faults, min_silos=1
    )
    totals = coord.run()
    assert totals.rounds_failed == 1
    assert _events(run, "round_failed")[0]["valid"] == 0
    assert not run.dir.metrics_path.exists()  # nothing committed
    _assert_weights(params, start)


def test_coordinator_weights_equal_old_plus_the_broadcast_update(tmp_path):
    coord, engine, run, params, start = _setup(tmp_path, {"silo0": 1.0, "silo1": 2.0, "silo2": 3.0})
    coord.cfg.run.rounds = 2
    coord.run()
    # Round 2 received round 1's update; a silo applying it reproduces the coordinator's
    # weights after round 1 bitwise.
    update = decode_payload(engine.received_downlinks[1]).tensors
    state = run.index.round_state(1)
    weights, _ = run.get_tensors(state["global_blob"])
    for n in start:
        assert torch.equal(start[n] + update[n], weights[n])
    assert run.blobs.get(state["downlink_blob"]) == engine.received_downlinks[1]
