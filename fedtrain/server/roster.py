"""Which Flower node is which silo: greeting nodes with the run manifest, refusing (and
sending away) nodes that cannot join, greeting a restarted silo again.

:class:`NodeRoster` is the joining half of :class:`~fedtrain.server.flower_engine.FlowerEngine`:
a node becomes a silo by answering ``hello`` (the run manifest plus the tokenizer) with its silo
name. A node that refuses the manifest, or names a silo not in the run, is logged, sent
``leave`` with the reason (its reply is not awaited) and never sent work. A node that goes
offline and comes back, or whose silo answers ``need_hello`` (a restarted daemon without the
run: under node authentication a restarted silo keeps its node id, so it is no new node), is
greeted again; until it has accepted the manifest its silo is *rejoining* and gets no work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain.protocol.records import from_content, to_content

__all__ = ["DeploymentError", "NodeRoster"]

log = logging.getLogger("fedtrain.server")


class DeploymentError(RuntimeError):
    """The deployment cannot go on (silos missing, run directory busy, ...)."""


class NodeRoster:
    """Silo name <-> Flower node, and the messages that establish it; see the module docstring."""

    def __init__(
        self,
        grid: Grid,
        *,
        silos: list[str],
        run_id: str,
        manifest: dict[str, Any],
        tokenizer: bytes,
        poll_s: float,
        hello_timeout_s: float,
        rejoin_wait_s: float,
        leave_timeout_s: float,
        on_event: Callable[..., None] | None,
    ) -> None:
        self.grid = grid
        self.silos = list(silos)
        self.run_id = run_id
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.poll_s = poll_s
        self.hello_timeout_s = hello_timeout_s
        self.rejoin_wait_s = rejoin_wait_s
        """Longest a round waits for a restarted silo to accept the manifest again."""
        self.leave_timeout_s = leave_timeout_s
        """How long a refused node's ``leave`` stays outstanding (its reply is not needed)."""
        self.on_event = on_event or (lambda kind, **kw: None)
        self.nodes: dict[str, int] = {}
        self.state: dict[str, dict[str, Any] | None] = dict.fromkeys(self.silos)
        """Each silo's last reported version / work round / snapshots (None: unknown)."""
        self.refused: dict[int, str] = {}
        self._greeted: set[int] = set()
        self._hellos: dict[str, tuple[int, float]] = {}
        self._leaves: dict[str, tuple[int, float]] = {}
        self._rejoining: set[str] = set()
        """Known silos greeted again: no work until their hello is accepted."""

    # ------------------------------------------------------------ messaging
    def _message(
        self, node: int, header: dict[str, Any], blobs: Mapping[str, bytes | bytearray], ttl: float
    ) -> Message:
        content = to_content({**header, "run_id": self.run_id}, blobs)
        return Message(content=content, dst_node_id=node, message_type="train", ttl=ttl)

    def _pull(self, ids: list[str]) -> list[tuple[str, dict[str, Any], dict[str, bytes]]]:
        """Replies that arrived for ``ids``: (message id, header, blobs); Flower errors become
        error headers. Only pull what is outstanding: a pulled reply is gone from the SuperLink."""
        out = []
        for msg in self.grid.pull_messages(ids):
            mid = msg.metadata.reply_to_message_id
            if msg.has_error():
                header: dict[str, Any] = {"status": "error", "reason": msg.error.reason}
                blobs: dict[str, bytes] = {}
            else:
                try:
                    header, blobs = from_content(msg.content)
                except (ValueError, KeyError) as e:
                    header, blobs = {"status": "error", "reason": f"malformed reply: {e}"}, {}
            out.append((mid, header, blobs))
        return out

    # -------------------------------------------------------------- joining
    def _silo_of(self, node: int) -> str | None:
        return next((s for s, n in self.nodes.items() if n == node), None)

    def _discover(self) -> None:
        """Send the manifest to online nodes not greeted yet (again, after being offline)."""
        online = list(self.grid.get_node_ids())
        self._greeted &= set(online)
        new = [n for n in online if n not in self._greeted]
        if not new:
            return
        msgs = [
            self._message(
                n,
                {"op": "hello", "manifest": self.manifest},
                {"tokenizer": self.tokenizer},
                ttl=self.hello_timeout_s + 60,
            )
            for n in new
        ]
        for node, mid in zip(new, self.grid.push_messages(msgs), strict=True):
            self._greeted.add(node)
            self._hellos[mid] = (node, time.monotonic())
            silo = self._silo_of(node)
            if silo is not None:
                self._rejoining.add(silo)

    def _leave(self, node: int, reason: str) -> None:
        """Tell a refused node to go (``leave`` with the reason); its reply is not awaited."""
        msg = self._message(node, {"op": "leave", "reason": reason}, {}, ttl=60.0)
        for mid in self.grid.push_messages([msg]):
            self._leaves[mid] = (node, time.monotonic())

    def _refuse(self, node: int, silo: str | None, reason: str) -> None:
        self.refused[node] = reason
        log.warning("node %d (silo %s) refused the run: %s", node, silo or "?", reason)
        self.on_event("silo_refused", node=node, silo=silo, reason=reason)
        self._leave(node, reason)

    def _absorb_hellos(self) -> None:
        self._absorb_leaves()
        if not self._hellos:
            return
        for mid, header, _ in self._pull(list(self._hellos)):
            node, _ = self._hellos.pop(mid)
            silo = header.get("silo")
            if header.get("status") != "ok":
                self._refuse(node, silo, str(header.get("reason", "unknown")))
                continue
            if silo not in self.state:
                names = ", ".join(self.silos)
                self._refuse(node, silo, f"silo {silo!r} is not in this run (silos: {names})")
                continue
            old = self.nodes.get(silo)
            self.nodes[silo] = node
            self.state[silo] = _silo_state(header)
            self._rejoining.discard(silo)
            self.refused.pop(node, None)
            if old == node:
                log.info(
                    "silo %s rejoined (restarted; node %d, global version %s)",
                    silo,
                    node,
                    header.get("version"),
                )
                self.on_event("silo_rejoined", silo=silo, node=node, version=header.get("version"))
                continue
            log.info(
                "silo %s connected (node %d, %s process(es), global version %s)%s",
                silo,
                node,
                header.get("nproc"),
                header.get("version"),
                f", replacing node {old}" if old not in (None, node) else "",
            )
            self.on_event("silo_joined", silo=silo, node=node, version=header.get("version"))
        now = time.monotonic()
        for mid, (node, sent) in list(self._hellos.items()):
            if now - sent > self.hello_timeout_s:
                del self._hellos[mid]
                log.warning("node %d did not answer the manifest in %.0fs", node, now - sent)
                if self._silo_of(node) is not None:
                    self._greeted.discard(node)  # a known silo's node: greet it again

    def _absorb_leaves(self) -> None:
        """Pull (and forget) the replies to ``leave``; stop waiting for them after a while."""
        if not self._leaves:
            return
        for mid, _, _ in self._pull(list(self._leaves)):
            self._leaves.pop(mid, None)
        now = time.monotonic()
        for mid, (_, sent) in list(self._leaves.items()):
            if now - sent > self.leave_timeout_s:
                del self._leaves[mid]

    def _await_rejoins(self, targets: list[str], wait_s: float) -> None:
        """Give silos greeted again up to ``wait_s`` to accept the manifest before the round's
        work goes out (a restarted daemon cannot use work or weights before it has)."""
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            pending = {n for n, _ in self._hellos.values()}
            if not any(self.nodes.get(s) in pending for s in targets if s in self._rejoining):
                return
            time.sleep(self.poll_s)
            self._absorb_hellos()

    def connect(self, timeout_s: float) -> None:
        """Wait until every configured silo has accepted the manifest."""
        start = last = time.monotonic()
        while True:
            self._discover()
            self._absorb_hellos()
            missing = [s for s in self.silos if s not in self.nodes]
            if not missing:
                return
            now = time.monotonic()
            if now - start > timeout_s:
                raise DeploymentError(
                    f"silos {', '.join(missing)} did not join within {timeout_s:.0f}s"
                    + (f" (refused: {sorted(set(self.refused.values()))})" if self.refused else "")
                )
            if now - last > 15:
                log.info("waiting for silos: %s", ", ".join(missing))
                last = now
            time.sleep(max(self.poll_s, 0.25))


def _silo_state(header: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": int(header.get("version", -1)),
        "work_round": int(header.get("work_round", 0)),
        "snapshots": [tuple(x) for x in header.get("snapshots", [])],
    }
