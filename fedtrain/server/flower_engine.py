"""The Flower engine: the coordinator's rounds over a Flower ``Grid``.

:class:`FlowerEngine` implements :class:`~fedtrain.server.engine.Engine` over a Flower ``Grid``
with its own push/pull loop (a short poll instead of ``send_and_receive``'s 3 s sleep), so the
same coordinator round loop, strategies, validation and run store serve simulation and
deployment.

Silos join through :class:`~fedtrain.server.roster.NodeRoster` (hello, leave, rejoin). Each
silo reports which global *version* its anchor holds and which snapshots it keeps
(:mod:`fedtrain.client.daemon`); the engine sends the round's outer update only to a silo that
will hold the version the update applies to, and full weights to any other (a restarted or
lagging silo), so no silo ever applies an update on top of the wrong weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain.protocol.work import Work, work_to_json
from fedtrain.server.engine import Reply
from fedtrain.server.roster import DeploymentError, NodeRoster, _silo_state

__all__ = ["DeploymentError", "FlowerEngine"]

log = logging.getLogger("fedtrain.server")


class FlowerEngine(NodeRoster):
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
        rejoin_wait_s: float = 30.0,
        leave_timeout_s: float = 10.0,
        on_event: Callable[..., None] | None = None,
        public_keys: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            grid,
            silos=silos,
            run_id=run_id,
            manifest=manifest,
            tokenizer=tokenizer,
            poll_s=poll_s,
            hello_timeout_s=hello_timeout_s,
            rejoin_wait_s=rejoin_wait_s,
            leave_timeout_s=leave_timeout_s,
            on_event=on_event,
        )
        self.public_keys: dict[str, Any] = dict(public_keys or {})
        """Silo -> its update-signing public key (empty: the run signs nothing)."""
        self.measured_step_time_s: float | None = None
        """Real silos time themselves: nothing is measured here."""
        self.weights = weights
        """Full global weights, encoded, for a silo that needs resyncing (arg: round)."""
        self.version = 0
        """Global version: number of outer updates broadcast so far."""
        self.compute_s: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        self.resync_bytes = 0
        self._joined: set[str] = set()

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

    def join(self, weights_payload: bytes | bytearray) -> int:
        # The first round carries full weights to each silo (their version is unknown).
        return len(weights_payload) * len(self.silos)

    def run_round(
        self,
        round: int,
        work: dict[str, Work],
        downlink: bytes | bytearray | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        return self._exchange("round", round, work, downlink, deadline_s)

    def _exchange(
        self,
        op: str,
        rnd: int,
        work: dict[str, Work] | None,
        downlink: bytes | bytearray | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        targets = list(work) if work is not None else list(self.silos)
        self._discover()
        self._absorb_hellos()
        self._await_rejoins(targets, min(self.rejoin_wait_s, deadline_s / 2))
        base = self.version
        if downlink is not None:
            self.version += 1
        msgs = self._outgoing(op, rnd, targets, work, downlink, base, deadline_s)
        start = time.monotonic()
        pushed = self.grid.push_messages(list(msgs.values())) if msgs else []
        ids = dict(zip(pushed, msgs, strict=True))
        yield from self._unsent([s for s in targets if s not in msgs])
        wait = self.poll_s
        try:
            while ids:
                elapsed = time.monotonic() - start
                if elapsed > deadline_s:
                    break
                waiting = len(ids)
                # One message at a time: a pulled reply's bytes are released once it is folded,
                # before the next is pulled (a batch pull would hold every silo's at once).
                for mid in list(ids):
                    pulled = self._pull([mid])
                    if not pulled:
                        continue
                    _, header, blobs = pulled.pop()
                    reply = self._reply(ids.pop(mid), rnd, header, blobs, time.monotonic() - start)
                    del header, blobs
                    yield reply
                    del reply
                self._absorb_hellos()
                if ids:
                    # Poll less often while nothing comes (a pull per outstanding silo).
                    wait = self.poll_s if len(ids) < waiting else min(2 * wait, 1.0)
                    time.sleep(wait)
            for silo in list(ids.values()):
                self.state[silo] = None
                yield Reply(
                    silo=silo,
                    payload=None,
                    arrival_s=time.monotonic() - start,
                    error=f"no reply within {deadline_s:.0f}s",
                    node=self.nodes.get(silo),
                )
            ids.clear()
        finally:
            for silo in ids.values():  # the coordinator closed the round early
                self.state[silo] = None

    def _outgoing(
        self,
        op: str,
        rnd: int,
        targets: list[str],
        work: dict[str, Work] | None,
        downlink: bytes | bytearray | None,
        base: int,
        deadline_s: float,
    ) -> dict[str, Message]:
        """Silo -> its message: the update for a silo that will hold ``base``, full weights for
        any other; none for a silo not connected or rejoining."""
        # Wall-clock end of the round, for a silo's fault hooks (drop holds its reply past it).
        deadline_unix = round(time.time() + deadline_s, 3)
        full: bytes | None = None
        msgs = {}
        for silo in targets:
            node = self.nodes.get(silo)
            if node is None or silo in self._rejoining:
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
            blobs: dict[str, bytes | bytearray] = {}
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
        return msgs

    def _unsent(self, silos: list[str]) -> Iterator[Reply]:
        """Failed replies for silos sent nothing: not connected, or not rejoined yet."""
        for silo in silos:
            self.state[silo] = None
            node = self.nodes.get(silo)
            if node is None:
                yield Reply(silo=silo, payload=None, arrival_s=0.0, error="silo not connected")
                continue
            refused = self.refused.get(node)
            why = (
                f"refused the manifest again: {refused}"
                if refused
                else "restarted; it has not accepted the manifest again yet"
            )
            yield Reply(silo=silo, payload=None, arrival_s=0.0, error=why, node=node)

    def _current(self, silo: str) -> int | None:
        st = self.state.get(silo)
        return None if st is None else int(st["version"])

    def _reply(
        self, silo: str, rnd: int, header: dict[str, Any], blobs: dict[str, bytes], arrival: float
    ) -> Reply:
        node = self.nodes.get(silo)
        if header.get("status") != "ok":
            # Not logged here: the round loop logs each failure once, with the node id.
            self.state[silo] = None
            if header.get("need_hello") and node is not None:
                # The silo restarted without the run (under node authentication it keeps its
                # node id, so discovery alone never sees a new node): greet it again, and send
                # it nothing more until it has accepted the manifest.
                self._greeted.discard(node)
                self._rejoining.add(silo)
            reason = str(header.get("reason", "unknown error"))
            return Reply(silo=silo, payload=None, arrival_s=arrival, error=reason, node=node)
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
        return Reply(silo=silo, payload=blobs.get("payload", b""), arrival_s=arrival, node=node)

    def finish(self, downlink: bytes | bytearray | None) -> int:
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
