"""The virtual silos' Flower ClientApp under Flower's simulation runtime (Ray).

The runtime runs the ClientApp for each message in whichever Ray actor of its pool is free, so
neither the app nor an actor can hold a silo's state. Each message therefore builds the silo's
trainer daemon (:class:`~fedtrain.client.daemon.Daemon`: the code a deployed silo runs, on a
one-process gloo group) from the silo's work dir — manifest, tokenizer and the snapshot the
daemon wrote after its last round — lets it answer, and leaves its new snapshot behind. The
node's ``partition-id`` (0 … silos-1) names the silo.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtrain.protocol.records import from_content, to_content
from fedtrain.runtime.children import peak_rss_bytes

__all__ = ["make_client_app", "serve_message"]


def make_client_app(root: Path, silos: list[str], *, threads: int, signing: bool) -> ClientApp:
    """A ClientApp whose node ``partition-id`` i is silo ``silos[i]``, with its work dir (and,
    with ``signing``, its ``sign_key``) in ``root/<silo>``; torch uses ``threads`` threads."""
    app = ClientApp()
    names = list(silos)

    @app.train()
    def silo(msg: Message, context: Context) -> Message:
        return serve_message(msg, context, root=root, silos=names, threads=threads, signing=signing)

    return app


def _error(msg: Message, silo: str, reason: str) -> Message:
    return Message(
        to_content({"status": "error", "silo": silo, "reason": reason}, {}), reply_to=msg
    )


def serve_message(
    msg: Message, context: Context, *, root: Path, silos: list[str], threads: int, signing: bool
) -> Message:
    """Answer one message as the silo this node stands for (see the module docstring)."""
    part = context.node_config.get("partition-id")
    index = int(part) if isinstance(part, int) else -1
    if not 0 <= index < len(silos):
        return _error(msg, "?", f"node partition-id {part!r} names no silo of this run")
    silo = silos[index]
    try:
        header, blobs = from_content(msg.content)
    except ValueError as e:
        return _error(msg, silo, str(e))
    reply: dict[str, Any]
    try:
        reply, out = _daemon_reply(root / silo, silo, header, blobs, threads, signing)
    except Exception as e:  # the silo failed: the coordinator logs why and carries on
        reply, out = {"status": "error", "silo": silo, "reason": f"{type(e).__name__}: {e}"}, {}
    reply["mailbox_pid"] = os.getpid()
    reply["mailbox_peak_rss"] = peak_rss_bytes()
    return Message(to_content(reply, out), reply_to=msg)


def _daemon_reply(
    work_dir: Path,
    silo: str,
    header: dict[str, Any],
    blobs: dict[str, bytes],
    threads: int,
    signing: bool,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The silo's trainer daemon, rebuilt from ``work_dir``, answers the request."""
    _setup_torch(threads)
    from fedtrain.client.daemon import Daemon

    args = argparse.Namespace(
        silo=silo,
        work_dir=str(work_dir),
        signing_key=str(work_dir / "sign_key") if signing else None,
        data=None,
    )
    daemon = Daemon(args)
    if header.get("op") != "hello":
        daemon.reopen(str(header.get("run_id", "")))  # not joined: handle() says "hello first"
    return daemon.handle(header, blobs)


def _setup_torch(threads: int) -> None:
    """One-process gloo group (the daemon's trainer is FSDP-sharded over its local ranks: here
    one) and the thread count, once per actor process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
