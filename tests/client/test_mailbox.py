"""The mailbox ClientApp never forwards a launcher-only request from the network."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from fedtrain.client.app import forward
from fedtrain.protocol.records import from_content, to_content


def test_shutdown_from_the_network_is_not_forwarded(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # as inside a Flower task
        monkeypatch.setattr(TaskIdentity, field, 1, raising=False)
    msg = Message(
        content=to_content({"op": "shutdown", "run_id": "r"}, {}),
        dst_node_id=1,
        message_type="train",
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"silo": "silo0", "socket": str(tmp_path / "no-daemon.sock")},
        state=RecordDict(),
        run_config={},
    )
    header, _ = from_content(forward(msg, ctx).content)
    assert header["status"] == "error" and header["reason"] == "'shutdown' is local only"
