"""The silo daemon's request handling in one process (a one-rank gloo group): a restarted daemon
resumes its run from the work dir instead of asking for ``hello``; a silo that never joined
says ``need_hello``; ``leave`` and ``shutdown``; the events the operator is shown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import tomli_w
import torch.distributed as dist

from fedtrain.client.daemon import Daemon
from fedtrain.client.events import EVENTS_FILE
from fedtrain.config import config_from_dict, config_to_dict
from fedtrain.models import PRESETS, build_model
from fedtrain.protocol.manifest import build_manifest
from fedtrain.protocol.work import TrainWork, work_to_json
from tests.conftest import tiny_config_dict

TOKENIZER = b'{"type": "byte"}\n'
RUN = "run-a"


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "own.txt"
    words = ["silo", "round", "anchor", "weights", "federated", "steps", "token", "loss"]
    path.write_text(" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(4000)))
    return path


def _daemon(work: Path, data: Path) -> Daemon:
    args = argparse.Namespace(silo="silo0", work_dir=str(work), signing_key=None, data=str(data))
    return Daemon(args)


def _manifest() -> dict:
    cfg = config_from_dict(tiny_config_dict(train={"inner_steps": 2}))
    return build_manifest(cfg, RUN, tomli_w.dumps(config_to_dict(cfg)), TOKENIZER, 256)


def _round(rnd: int) -> dict:
    return {"op": "round", "run_id": RUN, "round": rnd, "work": work_to_json(TrainWork(steps=2))}


def _events(work: Path) -> list[dict]:
    return [json.loads(x) for x in (work / EVENTS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def joined(tmp_path_factory, corpus) -> Path:
    """A work dir whose daemon joined RUN and trained round 1 (manifest + snapshot saved)."""
    work = tmp_path_factory.mktemp("silo0")
    d = _daemon(work, corpus)
    reply, _ = d.handle(
        {"op": "hello", "run_id": RUN, "manifest": _manifest()}, {"tokenizer": TOKENIZER}
    )
    assert reply["status"] == "ok", reply
    reply, out = d.handle(_round(1), {})
    assert reply["status"] == "ok", reply
    d.stop()
    return work


def test_join_and_round_are_recorded(joined):
    joined_ev, round_ev = _events(joined)[:2]
    assert joined_ev["event"] == "joined" and joined_ev["run_id"] == RUN
    assert joined_ev["preset"] == "tiny" and joined_ev["codec"] == "fp32"
    model = build_model(PRESETS["tiny"], 256, 0)
    assert joined_ev["params"] == sum(p.numel() for p in model.parameters())
    assert joined_ev["resumed_round"] is None
    assert round_ev["event"] == "round" and round_ev["round"] == 1 and round_ev["steps"] == 2
    assert round_ev["bytes_up"] > 0 and round_ev["bytes_down"] == 0 and round_ev["missed"] == []


def test_restarted_daemon_resumes_without_hello(joined, corpus):
    d = _daemon(joined, corpus)  # a new process over the same work dir: nothing open
    reply, out = d.handle(_round(3), {})
    d.stop()
    assert reply["status"] == "ok", reply
    assert reply["work_round"] == 3 and reply["step"] == 4  # round 1's 2 steps carried on
    assert out["payload"]
    resumed, trained = _events(joined)[-2:]
    assert resumed["event"] == "joined" and resumed["resumed_round"] == 1
    assert trained["round"] == 3 and trained["missed"] == [2]


def test_silo_that_never_joined_asks_for_hello(tmp_path, corpus):
    d = _daemon(tmp_path, corpus)
    reply, out = d.handle(_round(1), {})
    assert reply["status"] == "error" and out == {}
    assert reply["reason"] == "no manifest for this run yet (hello first)"
    assert reply["need_hello"] is True
    failed = _events(tmp_path)[-1]
    assert failed["event"] == "round_failed" and "hello first" in failed["reason"]
    reply, _ = d.handle({"op": "bogus", "run_id": RUN}, {})
    assert reply["need_hello"] is True  # any request for a run it has no manifest of


def test_other_refusals_do_not_ask_for_hello(joined, corpus):
    d = _daemon(joined, corpus)
    reply, _ = d.handle({"op": "bogus", "run_id": RUN}, {})
    d.stop()
    assert reply["status"] == "error" and reply["reason"] == "unknown request 'bogus'"
    assert "need_hello" not in reply


def test_leave_is_recorded_and_answered(tmp_path, corpus):
    d = _daemon(tmp_path, corpus)
    why = "silo 'silo9' is not in this run (silos: silo0, silo1)"
    reply, out = d.handle({"op": "leave", "run_id": RUN, "reason": why}, {})
    assert reply == {"status": "ok", "silo": "silo0"} and out == {}
    assert _events(tmp_path)[-1] == {**_events(tmp_path)[-1], "event": "refused", "reason": why}


def test_refused_manifest_is_recorded(tmp_path, corpus):
    d = _daemon(tmp_path, corpus)
    bad = {**_manifest(), "fedtrain_version": "0.0.1"}
    reply, _ = d.handle({"op": "hello", "run_id": RUN, "manifest": bad}, {"tokenizer": TOKENIZER})
    assert reply["status"] == "error" and "fedtrain version" in reply["reason"]
    last = _events(tmp_path)[-1]
    assert last["event"] == "refused" and last["reason"] == reply["reason"]


def test_shutdown_ends_the_socket_loop(tmp_path, corpus):
    d = _daemon(tmp_path, corpus)
    assert not d.stopping
    reply, _ = d.handle({"op": "shutdown"}, {})
    assert reply["status"] == "ok" and d.stopping
