"""How the Flower engine greets, refuses and re-greets nodes, over a fake Grid whose silos are
scripted: a restarted silo that keeps its node id is greeted again, a silo name not in the run
is sent ``leave`` and no work, and a failing silo is logged once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedtrain.config import config_from_dict
from fedtrain.models import PRESETS, build_model
from fedtrain.protocol.records import from_content, to_content
from fedtrain.protocol.work import TrainWork
from fedtrain.server import Coordinator
from fedtrain.server.flower_engine import FlowerEngine
from fedtrain.storage.runstore import RunStore
from fedtrain.strategies import build_strategy
from fedtrain.transport import encode_payload
from tests.conftest import tiny_config_dict


@pytest.fixture(autouse=True)
def _flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Message can only be made inside a Flower task (a ServerApp): pretend to be one."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


Handler = Callable[[dict[str, Any], dict[str, bytes]], "dict[str, Any] | tuple | None"]


def ok(silo: str, version: int = 0, work_round: int = 0) -> dict[str, Any]:
    return {
        "status": "ok",
        "silo": silo,
        "version": version,
        "work_round": work_round,
        "snapshots": [],
        "nproc": 1,
    }


class FakeGrid:
    """A Grid whose nodes answer at once through a handler per node (None: no reply)."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[tuple[int, dict[str, Any], dict[str, bytes]]] = []
        self._replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            assert msg, "push_messages with nothing to push"
            node = msg.metadata.dst_node_id
            header, blobs = from_content(msg.content)
            self.sent.append((node, header, blobs))
            mid = f"m{len(self.sent)}"
            ids.append(mid)
            answer = self.handlers[node](header, blobs)
            if answer is not None:
                head, out = answer if isinstance(answer, tuple) else (answer, {})
                self._replies[mid] = SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid),
                    has_error=lambda: False,
                    content=to_content(head, out),
                )
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]

    def ops(self, node: int) -> list[str]:
        return [h["op"] for n, h, _ in self.sent if n == node]


def engine(grid: FakeGrid, silos: list[str], **kw: Any) -> FlowerEngine:
    return FlowerEngine(
        grid,  # type: ignore[arg-type]
        silos=silos,
        run_id="r",
        manifest={"run_id": "r"},
        tokenizer=b"tok",
        weights=lambda rnd: b"W",
        poll_s=0.001,
        **kw,
    )


class RestartingSilo:
    """Answers hello and rounds; after :meth:`restart` it has no run until greeted again."""

    def __init__(self, name: str) -> None:
        self.name, self.has_run, self.answer_hello = name, False, True

    def restart(self) -> None:
        self.has_run = False

    def __call__(self, header: dict[str, Any], blobs: dict[str, bytes]) -> Any:
        if header["op"] == "hello":
            if not self.answer_hello:
                return None
            self.has_run = True
            return ok(self.name, version=-1)  # a fresh daemon holds no global version
        if not self.has_run:
            return {
                "status": "error",
                "silo": self.name,
                "reason": "no manifest for this run yet (hello first)",
                "need_hello": True,
            }
        return ok(self.name, version=int(header["version"]), work_round=int(header["round"]))


def _round(e: FlowerEngine, rnd: int) -> list[Any]:
    return list(e.run_round(rnd, {"silo0": TrainWork(steps=1)}, None, deadline_s=5.0))


def test_a_restarted_silo_with_the_same_node_id_is_greeted_again(caplog):
    silo = RestartingSilo("silo0")
    grid = FakeGrid({7: silo})
    e = engine(grid, ["silo0"])
    e.connect(5.0)
    assert grid.ops(7) == ["hello"]
    assert _round(e, 1)[0].error is None

    silo.restart()  # killed and started again: same node id (node authentication)
    (failed,) = _round(e, 2)
    assert "hello first" in (failed.error or "") and failed.node == 7
    with caplog.at_level(logging.INFO, logger="fedtrain.server"):
        (reply,) = _round(e, 3)
    assert reply.error is None
    assert grid.ops(7) == ["hello", "round", "round", "hello", "round"]
    assert "weights" in grid.sent[-1][2]  # it holds no version: full weights
    assert any("silo silo0 rejoined (restarted" in r.getMessage() for r in caplog.records)
    assert not any("connected" in r.getMessage() for r in caplog.records)


def test_a_node_back_online_is_greeted_again():
    silo = RestartingSilo("silo0")
    grid = FakeGrid({7: silo})
    e = engine(grid, ["silo0"])
    e.connect(5.0)
    handler = grid.handlers.pop(7)  # offline (its SuperNode stopped)
    e._discover()
    grid.handlers[7] = handler  # back, same node id
    silo.restart()
    (reply,) = _round(e, 1)
    assert reply.error is None
    assert grid.ops(7) == ["hello", "hello", "round"]


def test_a_silo_that_has_not_rejoined_gets_no_work_or_weights():
    silo = RestartingSilo("silo0")
    grid = FakeGrid({7: silo})
    e = engine(grid, ["silo0"], rejoin_wait_s=0.05)
    e.connect(5.0)
    silo.restart()
    silo.answer_hello = False  # it does not answer the new hello (yet)
    _round(e, 1)
    for rnd in (2, 3):
        (reply,) = _round(e, rnd)
        assert reply.error == "restarted; it has not accepted the manifest again yet"
    assert grid.ops(7) == ["hello", "round", "hello"]  # one hello, nothing after it


def test_a_silo_name_not_in_the_run_is_sent_leave_and_no_work():
    grid = FakeGrid({1: lambda h, b: ok("silo0"), 9: lambda h, b: ok("silo9")})
    e = engine(grid, ["silo0", "silo1"])
    e._discover()
    e._absorb_hellos()
    assert grid.ops(9) == ["hello", "leave"]
    _, leave, _ = grid.sent[-1]
    assert leave["reason"] == "silo 'silo9' is not in this run (silos: silo0, silo1)"
    assert leave["run_id"] == "r"
    list(e.run_round(1, {"silo0": TrainWork(steps=1), "silo1": TrainWork(steps=1)}, None, 5.0))
    assert grid.ops(9) == ["hello", "leave"]
    assert grid.ops(1) == ["hello", "round"]


def test_a_node_that_refuses_the_manifest_is_sent_leave_with_its_reason():
    reason = "silo 'silo9' is not in this run (silos: silo0)"
    grid = FakeGrid({9: lambda h, b: {"status": "error", "silo": "silo9", "reason": reason}})
    e = engine(grid, ["silo0"], leave_timeout_s=0.0)
    e._discover()
    e._absorb_hellos()
    assert [(h["op"], h.get("reason")) for _, h, _ in grid.sent] == [
        ("hello", None),
        ("leave", reason),
    ]
    assert e.refused == {9: reason}
    e._absorb_hellos()  # the unanswered leave is not waited for
    assert e._leaves == {}


def _coordinator(tmp_path, grid_for: Callable[[dict[str, torch.Tensor]], FakeGrid]) -> Any:
    cfg = config_from_dict(
        tiny_config_dict(
            data={"silos": 2, "max_chars": 50_000},
            run={"rounds": 1},
            strategy={"name": "fedavg"},
            round={"timeout_s": 10.0, "min_silos": 1},
        )
    )
    model = build_model(PRESETS["tiny"], 256, 0)
    params = dict(model.named_parameters())
    e = engine(grid_for(params), cfg.silo_names())
    e.connect(5.0)
    return Coordinator(
        cfg=cfg,
        run_id="r",
        model=model,
        strategy=build_strategy(cfg, params),
        engine=e,
        store=RunStore(tmp_path),
        eval_batch=torch.randint(0, 256, (2, 33)),
    )


def test_a_failing_silo_is_logged_once_with_its_node(tmp_path, caplog):
    def grid_for(params: dict[str, torch.Tensor]) -> FakeGrid:
        def silo0(header: dict[str, Any], blobs: dict[str, bytes]) -> Any:
            if header["op"] != "round":
                return ok("silo0")
            delta = {n: torch.zeros_like(p) for n, p in params.items()}
            payload = encode_payload(
                delta,
                codec="fp32",
                kind="pseudo_grad",
                run_id="r",
                round=int(header["round"]),
                sender="silo0",
                meta={"tokens": 100, "train_loss": 1.0},
            )
            return ok("silo0", 1, int(header["round"])), {"payload": payload}

        def silo1(header: dict[str, Any], blobs: dict[str, bytes]) -> Any:
            if header["op"] == "hello":
                return ok("silo1")
            return {"status": "error", "silo": "silo1", "reason": "out of memory"}

        return FakeGrid({3: silo0, 4: silo1})

    coord = _coordinator(tmp_path, grid_for)
    with caplog.at_level(logging.WARNING):
        coord.run()
    lines = [r.getMessage() for r in caplog.records if "failed in round" in r.getMessage()]
    assert lines == ["silo silo1 (node 4) failed in round 1: out of memory"]
