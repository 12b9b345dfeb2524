"""The silo's Flower ClientApp: a mailbox between the SuperNode and the trainer daemon.

Flower starts this app in a fresh process for every message, so it holds no state and imports
no torch: it forwards the message's header and payload bytes to the daemon's Unix socket (named
in the SuperNode's ``--node-config``: ``silo`` and ``socket``) and returns the daemon's reply.
A ``shutdown`` request is the launcher's alone and is not forwarded.
"""

from __future__ import annotations

import os
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtrain.protocol.localapi import LocalAPIError, request
from fedtrain.protocol.records import from_content, to_content
from fedtrain.runtime.children import peak_rss_bytes

__all__ = ["LOCAL_ONLY", "app"]

app = ClientApp()

LOCAL_ONLY = ("shutdown",)
"""Daemon requests only the silo's own launcher may make (never forwarded from the network)."""


@app.train()
def forward(msg: Message, context: Context) -> Message:
    silo = str(context.node_config.get("silo", "?"))
    path = context.node_config.get("socket")
    try:
        header, blobs = from_content(msg.content)
    except ValueError as e:
        return Message(
            to_content({"status": "error", "silo": silo, "reason": str(e)}, {}), reply_to=msg
        )
    if not path:
        missing = {"status": "error", "silo": silo, "reason": "node config has no 'socket'"}
        return Message(to_content(missing, {}), reply_to=msg)
    if header.get("op") in LOCAL_ONLY:
        local = {"status": "error", "silo": silo, "reason": f"{header['op']!r} is local only"}
        return Message(to_content(local, {}), reply_to=msg)
    reply: dict[str, Any]
    try:
        reply, out = request(str(path), header, blobs)
    except LocalAPIError as e:
        reply, out = {"status": "error", "silo": silo, "reason": str(e)}, {}
    reply["mailbox_pid"] = os.getpid()
    reply["mailbox_peak_rss"] = peak_rss_bytes()
    return Message(to_content(reply, out), reply_to=msg)
