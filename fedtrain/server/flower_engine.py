"""The Flower engine: the coordinator's rounds over a Flower ``Grid``.

:class:`FlowerEngine` implements :class:`~fedtrain.server.engine.Engine` over a Flower ``Grid``
with its own push/pull loop (a short poll instead of ``send_and_receive``'s 3 s sleep), so the
same coordinator round loop, strategies, validation and run store serve simulation and
deployment.

Silos are Flower nodes. A node becomes a silo by answering ``hello`` (the run manifest plus the
tokenizer) with its silo name; a silo that refuses the manifest is logged with the reason and
left out. Each silo reports which global *version* its anchor holds and which snapshots it
keeps (:mod:`fedtrain.client.daemon`); the engine sends the round's outer update only to a silo
that will hold the version the update applies to, and full weights to any other (a restarted or
lagging silo), so no silo ever applies an update on top of the wrong weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain.protocol.records import from_content, to_content
from fedtrain.protocol.work import Work, work_to_json
from fedtrain.server.engine import Reply

__all__ = ["DeploymentError", "FlowerEngine"]

log = logging.getLogger("fedtrain.server")


class DeploymentError(RuntimeError):
    """The deployment cannot go on (silos missing, run directory busy, ...)."""


class FlowerEngine:
    """Rounds over Flower nodes; see the module docstring."""

    def __init__(
        self,
        grid: Grid,
        *,
        silos: list[str],
        run_id: str,
        manifest: dict[str, Any],
        tokenizer: bytes,
        weights: Callable[[int], bytes],
        poll_s: float = 0.1,
        hello_timeout_s: float = 60.0,
        on_event: Callable[..., None] | None = None,
        public_keys: dict[str, Any] | None = None,
    ) -> None:
        self.grid = grid
        self.silos = list(silos)
        self.public_keys: dict[str, Any] = dict(public_keys or {})
        """Silo -> its update-signing public key (empty: the run signs nothing)."""
        self.measured_step_time_s: float | None = None
        """Real silos time themselves: nothing is measured here."""
        self.run_id = run_id
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.weights = weights
        """Full global weights, encoded, for a silo that needs resyncing (arg: round)."""
        self.poll_s = poll_s
        self.hello_timeout_s = hello_timeout_s
        self.on_event = on_event or (lambda kind, **kw: None)
        self.nodes: dict[str, int] = {}
        self.state: dict[str, dict[str, Any] | None] = dict.fromkeys(self.silos)
        """Each silo's last reported version / work round / snapshots (None: unknown)."""
        self.version = 0
        """Global version: number of outer updates broadcast so far."""
        self.refused: dict[int, str] = {}
        self._greeted: set[int] = set()
        self._hellos: dict[str, tuple[int, float]] = {}
        self.compute_s: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        self.resync_bytes = 0
        self._joined: set[str] = set()

    # ------------------------------------------------------------ messaging
    def _message(
        self, node: int, header: dict[str, Any], blobs: dict[str, bytes], ttl: float
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
    def _discover(self) -> None:
        """Send the manifest to nodes not greeted yet."""
        new = [n for n in self.grid.get_node_ids() if n not in self._greeted]
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

    def _absorb_hellos(self) -> None:
        if not self._hellos:
            return
        for mid, header, _ in self._pull(list(self._hellos)):
            node, _ = self._hellos.pop(mid)
            silo = header.get("silo")
            if header.get("status") != "ok":
                reason = header.get("reason", "unknown")
                self.refused[node] = reason
                log.warning("node %d (silo %s) refused the run: %s", node, silo or "?", reason)
                self.on_event("silo_refused", node=node, silo=silo, reason=reason)
                continue
            if silo not in self.state:
                reason = f"silo name {silo!r} is not in this run"
                self.refused[node] = reason
                log.warning("node %d refused: %s", node, reason)
                self.on_event("silo_refused", node=node, silo=silo, reason=reason)
                continue
            old = self.nodes.get(silo)
            self.nodes[silo] = node
            self.state[silo] = _silo_state(header)
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

    # --------------------------------------------------------------- rounds
    def _effective_version(self, silo: str, rnd: int) -> int | None:
        """The version the silo will hold when it starts round ``rnd`` (after any rollback)."""
        st = self.state.get(silo)
        if st is None:
            return None
        if st["work_round"] < rnd:
            return int(st["version"])
        earlier = [v for w, v in st["snapshots"] if w < rnd]
        return int(earlier[-1]) if earlier else None

    def join(self, weights_payload: bytes) -> int:
        # The first round carries full weights to each silo (their version is unknown).
        return len(weights_payload) * len(self.silos)

    def run_round(
        self, round: int, work: dict[str, Work], downlink: bytes | None, deadline_s: float
    ) -> Iterator[Reply]:
        return self._exchange("round", round, work, downlink, deadline_s)

    def _exchange(
        self,
        op: str,
        rnd: int,
        work: dict[str, Work] | None,
        downlink: bytes | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        self._discover()
        self._absorb_hellos()
        base = self.version
        if downlink is not None:
            self.version += 1
        targets = list(work) if work is not None else list(self.silos)
        # Wall-clock end of the round, for a silo's fault hooks (drop holds its reply past it).
        deadline_unix = round(time.time() + deadline_s, 3)
        full: bytes | None = None
        msgs, missing = {}, []
        for silo in targets:
            node = self.nodes.get(silo)
            if node is None:
                missing.append(silo)
                continue
            header: dict[str, Any] = {
                "op": op,
                "round": rnd,
                "base_version": base,
                "version": self.version,
                "deadline_unix": deadline_unix,
            }
            if work is not None:
                header["work"] = work_to_json(work[silo])
            have = self._effective_version(silo, rnd) if op == "round" else self._current(silo)
            blobs: dict[str, bytes] = {}
            if downlink is not None and have == base:
                blobs["downlink"] = downlink
            elif have != self.version:
                full = full if full is not None else self.weights(rnd)
                blobs["weights"] = full
                if silo in self._joined:  # the first full weights are the join, metered there
                    self.resync_bytes += len(full)
                    self.on_event("resync", round=rnd, silo=silo, bytes_down=len(full), had=have)
                self._joined.add(silo)
            msgs[silo] = self._message(node, header, blobs, ttl=deadline_s + 60)
        start = time.monotonic()
        ids = dict(zip(self.grid.push_messages(list(msgs.values())), msgs, strict=True))
        for silo in missing:
            self.state[silo] = None
            yield Reply(silo=silo, payload=None, arrival_s=0.0, error="silo not connected")
        try:
            while ids:
                elapsed = time.monotonic() - start
                if elapsed > deadline_s:
                    break
                for mid, header, blobs in self._pull(list(ids)):
                    silo = ids.pop(mid)
                    arrival = time.monotonic() - start
                    yield self._reply(silo, rnd, header, blobs, arrival)
                self._absorb_hellos()
                if ids:
                    time.sleep(self.poll_s)
            for silo in list(ids.values()):
                self.state[silo] = None
                yield Reply(
                    silo=silo,
                    payload=None,
                    arrival_s=time.monotonic() - start,
                    error=f"no reply within {deadline_s:.0f}s",
                )
            ids.clear()
        finally:
            for silo in ids.values():  # the coordinator closed the round early
                self.state[silo] = None

    def _current(self, silo: str) -> int | None:
        st = self.state.get(silo)
        return None if st is None else int(st["version"])

    def _reply(
        self, silo: str, rnd: int, header: dict[str, Any], blobs: dict[str, bytes], arrival: float
    ) -> Reply:
        node = self.nodes.get(silo)
        if header.get("status") != "ok":
            self.state[silo] = None
            reason = str(header.get("reason", "unknown error"))
            log.warning("silo %s (node %s) failed in round %d: %s", silo, node, rnd, reason)
            return Reply(silo=silo, payload=None, arrival_s=arrival, error=reason)
        self.state[silo] = _silo_state(header)
        if "compute_s" in header:
            self.compute_s[silo] += float(header["compute_s"])
            self.on_event(
                "silo_report",
                round=rnd,
                silo=silo,
                node=node,
                heldout_loss=header.get("heldout_loss"),
                train_loss=header.get("train_loss"),
                compute_s=header.get("compute_s"),
                step=header.get("step"),
                daemon_pid=header.get("daemon_pid"),
                mailbox_pid=header.get("mailbox_pid"),
                mailbox_peak_rss=header.get("mailbox_peak_rss"),
                daemon_peak_rss=header.get("daemon_peak_rss"),
            )
        return Reply(silo=silo, payload=blobs.get("payload", b""), arrival_s=arrival)

    def finish(self, downlink: bytes | None) -> int:
        """Deliver the last outer update (or full weights) so silos end on the final model."""
        sent = 0
        for reply in self._exchange("finish", 0, None, downlink, 120.0):
            if reply.error is not None:
                log.warning(
                    "silo %s did not confirm the end of the run: %s", reply.silo, reply.error
                )
        if downlink is not None:
            sent = len(downlink) * len(self.nodes)
        return sent

    def save_state(self, store: Any, full: bool) -> dict[str, Any]:
        return {"version": self.version, "resync_bytes": self.resync_bytes}

    def restore_state(self, store: Any, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.resync_bytes = int(state.get("resync_bytes", 0))

    def sim_time_s(self) -> float | None:
        return None

    def close_round(self, duration_s: float) -> None:
        return None

    def round_stats(self) -> dict[str, Any]:
        return {}  # no clock to measure utilisation on: silos report compute_s only

    def utilisation(self) -> float | None:
        return None


def _silo_state(header: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": int(header.get("version", -1)),
        "work_round": int(header.get("work_round", 0)),
        "snapshots": [tuple(x) for x in header.get("snapshots", [])],
    }
