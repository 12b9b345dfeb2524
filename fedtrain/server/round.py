"""One round's bookkeeping: the counters as replies arrive, the triage of one reply, the result.

The coordinator (:mod:`fedtrain.server.coordinator`) drives the round; this module takes its
replies. :func:`triage` decides from a reply's facts alone whether it can count at all
(before the validator looks at its bytes); :class:`RoundIntake` validates, aggregates and
records each reply; :class:`RoundLedger` holds the round's counters; :class:`RoundResult` is
what the round hands back to the run loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedtrain.aggregation.mean import Aggregator
from fedtrain.protocol.work import TrainWork, Work
from fedtrain.server.engine import Reply
from fedtrain.server.totals import RunTotals
from fedtrain.server.validate import UpdateRejected, UpdateValidator
from fedtrain.storage.runstore import RunStore
from fedtrain.strategies.base import Strategy
from fedtrain.transport.payload import Payload

__all__ = ["RoundIntake", "RoundLedger", "RoundResult", "Verdict", "invalid", "triage"]

log = logging.getLogger(__name__)

VerdictKind = Literal[
    "accept", "duplicate", "quarantined", "straggler", "unsolicited", "failed", "invalid"
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What becomes of one reply."""

    kind: VerdictKind
    """``accept``: validate and count it; anything else: it does not count."""
    reason: str | None = None
    """Why it does not count (None when accepted)."""
    strike: bool = False
    """Whether it counts against the silo (rejected: toward quarantine)."""


ACCEPT = Verdict(kind="accept")


def triage(
    reply: Reply,
    *,
    n_sent: int,
    rnd: int,
    sent: Work | None,
    quarantined: dict[str, int],
    timeout_s: float,
) -> Verdict:
    """Whether the ``n_sent``-th reply of its silo in round ``rnd`` may count.

    ``sent`` is the work the silo was sent (None: none, or this is a repeat); ``quarantined``
    maps quarantined silos to the round they were quarantined in. An accepted reply still
    needs validating (:class:`~fedtrain.server.validate.UpdateValidator`).
    """
    if n_sent > 1:
        # One update per silo per round: a repeat never takes (or counts) the work again.
        return Verdict(
            kind="duplicate",
            reason=f"duplicate: reply {n_sent} from {reply.silo} in round {rnd}",
            strike=True,
        )
    if reply.silo in quarantined:
        return Verdict(
            kind="quarantined", reason=f"silo quarantined in round {quarantined[reply.silo]}"
        )
    if reply.arrival_s > timeout_s:
        return Verdict(
            kind="straggler",
            reason=f"straggler: arrived at {reply.arrival_s:.3f}s > {timeout_s}s",
        )
    if sent is None:
        return Verdict(
            kind="unsolicited", reason="reply from a silo that was sent no work", strike=True
        )
    if reply.error is not None or reply.payload is None:
        return Verdict(kind="failed", reason=f"silo failed: {reply.error}")
    return ACCEPT


def invalid(reason: str) -> Verdict:
    """A reply the validator refused (a strike)."""
    return Verdict(kind="invalid", reason=reason, strike=True)


@dataclass(kw_only=True, slots=True)
class RoundLedger:
    """The round's counters as replies arrive."""

    seen: int = 0
    """Silos heard from (repeats not counted)."""
    valid: int = 0
    """Updates that count."""
    stragglers: int = 0
    rejected: int = 0
    """Rejected updates (strikes) and failed silos."""
    bytes_up: int = 0
    """Bytes of every reply, counted or not."""
    tokens: int = 0
    """Tokens the counted updates report."""
    values: int = 0
    """Values carried by counted payloads (for the compression ratio)."""
    decoded_bytes: int = 0
    """Bytes of those payloads."""
    max_payload: int = 0
    max_values: int = 0
    loss_sum: float = 0.0
    """Token-weighted sum of the counted updates' train losses."""
    loss_w: float = 0.0
    last_arrival: float = 0.0
    """Arrival of the reply that completed the round (engine clock)."""
    accepted: list[str] = field(default_factory=list)
    """Silos whose updates count, in arrival order."""
    steps_taken: list[int] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)
    """Replies per silo so far."""

    def arrived(self, reply: Reply) -> int:
        """Count ``reply``'s bytes; return how many replies its silo has sent this round."""
        n_sent = self.replies[reply.silo] = self.replies.get(reply.silo, 0) + 1
        self.seen += n_sent == 1
        size = len(reply.payload or b"")
        self.bytes_up += size
        self.max_payload = max(self.max_payload, size)
        return n_sent

    def counted(
        self,
        *,
        silo: str,
        size: int,
        numel: int,
        steps: int,
        tokens: int,
        loss: float,
        arrival_s: float,
    ) -> None:
        """Count one accepted update."""
        self.steps_taken.append(steps)
        self.valid += 1
        self.accepted.append(silo)
        self.values += numel
        self.max_values = max(self.max_values, numel)
        self.decoded_bytes += size
        self.tokens += tokens
        self.loss_sum += loss * tokens
        self.loss_w += tokens
        self.last_arrival = max(self.last_arrival, arrival_s)


@dataclass(kw_only=True, slots=True)
class RoundResult:
    """What one round produced (the run loop's metrics row, totals and events read it)."""

    mean: dict[str, torch.Tensor] | None
    """The aggregate to step on, or None when the round failed (no quorum)."""
    steps: int
    """Mean inner steps of the counted updates."""
    decode_error: float | None
    valid: int
    accepted: list[str]
    tokens: int
    train_loss: float | None
    bytes_up: int
    stragglers: int
    rejected: int
    duration: float
    """Round time (engine clock): the completing reply's arrival, or the deadline."""
    buffer_bytes: int
    compression_up: float | None
    max_payload_bytes: int

    @classmethod
    def of(
        cls,
        led: RoundLedger,
        *,
        mean: dict[str, torch.Tensor] | None,
        tokens: int,
        decode_error: float | None,
        duration: float,
        buffer_bytes: int,
    ) -> RoundResult:
        """The result of a round whose counters are ``led``."""
        taken = led.steps_taken
        return cls(
            mean=mean,
            steps=round(sum(taken) / len(taken)) if taken else 0,
            decode_error=decode_error,
            valid=led.valid,
            accepted=led.accepted,
            tokens=tokens,
            train_loss=led.loss_sum / led.loss_w if led.loss_w else None,
            bytes_up=led.bytes_up,
            stragglers=led.stragglers,
            rejected=led.rejected,
            duration=duration,
            buffer_bytes=buffer_bytes,
            compression_up=4 * led.values / led.decoded_bytes if led.decoded_bytes else None,
            max_payload_bytes=led.max_payload,
        )

    def metrics_row(
        self,
        *,
        rnd: int,
        totals: RunTotals,
        work: dict[str, Work],
        eval_loss: float | None,
        bytes_down: int,
        sim_time_s: float | None,
        codec: str,
    ) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` row (``totals`` already include the round)."""
        return {
            "round": rnd,
            "step": totals.steps,
            "tokens": totals.tokens,
            "train_loss": self.train_loss,
            "eval_loss": eval_loss,
            "bytes_up": self.bytes_up,
            "bytes_down": bytes_down,
            "wall_s": totals.wall_s,
            "sim_time_s": sim_time_s,
            "silos": self.valid,
            "stragglers": self.stragglers,
            "rejected": self.rejected,
            "round_time_s": self.duration,
            "buffer_bytes": self.buffer_bytes,
            "codec": codec,
            "compression_up": self.compression_up,
            "fragment": next(
                (w.fragment if isinstance(w, TrainWork) else None for w in work.values()), None
            ),
            "max_payload_bytes": self.max_payload_bytes,
            "decode_error": self.decode_error,
            "quarantined": len(totals.quarantined),
        }


class RoundIntake:
    """Takes one round's replies in arrival order: triage, validation, the aggregate, records.

    ``outstanding`` is the coordinator's silo -> (round, work) not answered yet: a reply takes
    its work off it. ``strike(round, silo, reason)`` records a rejected update against a silo.
    """

    def __init__(
        self,
        *,
        rnd: int,
        work: dict[str, Work],
        downlink: bytes | bytearray | None,
        outstanding: dict[str, tuple[int, Work]],
        quarantined: dict[str, int],
        timeout_s: float,
        t0: float,
        validator: UpdateValidator,
        strategy: Strategy,
        store: RunStore,
        agg: Aggregator,
        strike: Callable[[int, str, str], None],
    ) -> None:
        self.rnd = rnd
        self.work = work
        self.downlink = downlink
        self.outstanding = outstanding
        self.quarantined = quarantined
        self.timeout_s = timeout_s
        self.t0 = t0
        """Engine-clock time the round started at (arrivals are relative to it)."""
        self.validator = validator
        self.strategy = strategy
        self.store = store
        self.agg = agg
        self.strike = strike
        self.led = RoundLedger()

    def take(self, reply: Reply) -> bool:
        """Triage, validate and count (or record as refused) one reply; True if it counts."""
        rnd, led, timeout = self.rnd, self.led, self.timeout_s
        n_sent = led.arrived(reply)
        sent_round, sent = (
            (rnd, None)
            if n_sent > 1
            else self.outstanding.pop(reply.silo, (rnd, self.work.get(reply.silo)))
        )
        verdict = triage(
            reply,
            n_sent=n_sent,
            rnd=rnd,
            sent=sent,
            quarantined=self.quarantined,
            timeout_s=timeout,
        )
        payload = None
        if verdict.kind == "straggler":
            led.stragglers += 1
            self.store.event(
                "straggler",
                round=rnd,
                silo=reply.silo,
                arrival_s=reply.arrival_s,
                timeout_s=timeout,
            )
        elif verdict.kind == "failed":
            led.rejected += 1
            self.store.event("failed", round=rnd, silo=reply.silo, reason=reply.error)
            at = "" if reply.node is None else f" (node {reply.node})"
            log.warning("silo %s%s failed in round %d: %s", reply.silo, at, rnd, reply.error)
        elif verdict.kind == "accept":
            assert sent is not None and reply.payload is not None
            try:
                payload = self.validator.check(
                    reply.payload,
                    silo=reply.silo,
                    round=sent_round,
                    names=sent.names,
                    shapes=sent.reply_shapes(),
                )
            except UpdateRejected as e:
                verdict = invalid(str(e))
        if n_sent == 1:
            self.strategy.received(reply.silo, self.t0 + reply.arrival_s, verdict.reason is None)
        if payload is None or verdict.reason is not None:
            self._refuse(reply, n_sent, verdict)
            return False
        self._count(reply, payload, rnd - sent_round)
        return True

    def _refuse(self, reply: Reply, n_sent: int, verdict: Verdict) -> None:
        """A reply that does not count: strike the silo if it earned one, keep the bytes."""
        assert verdict.reason is not None
        if verdict.strike:
            self.led.rejected += 1
            self.strike(self.rnd, reply.silo, verdict.reason)
        # Kept for debugging, marked invalid with the reason.
        self.store.store_update(
            self.rnd,
            reply.silo if n_sent == 1 else f"{reply.silo}#{n_sent}",
            reply.payload,
            valid=False,
            reason=verdict.reason,
            codec=None,
            weight=None,
        )

    def _count(self, reply: Reply, payload: Payload, staleness: int) -> None:
        """Fold a valid update into the round's aggregate; record it."""
        w = self.strategy.weight(payload.meta)
        meta = {**payload.meta, "staleness": staleness}
        self.agg.add(payload.tensors, w, sender=reply.silo, meta=meta)
        self.store.store_update(
            self.rnd,
            reply.silo,
            reply.payload,
            valid=True,
            reason=None,
            codec=payload.codec,
            weight=w,
        )
        size = len(reply.payload or b"")
        n_tok = int(payload.meta.get("tokens", 0))
        self.led.counted(
            silo=reply.silo,
            size=size,
            numel=payload.numel,
            steps=int(payload.meta.get("steps", 0)),
            tokens=n_tok,
            loss=float(payload.meta.get("train_loss", math.nan)),
            arrival_s=reply.arrival_s,
        )
        self.store.event(
            "reply",
            round=self.rnd,
            silo=reply.silo,
            bytes_up=size,
            bytes_down=len(self.downlink) if self.downlink else 0,
            codec=payload.codec,
            tokens=n_tok,
            train_loss=payload.meta.get("train_loss"),
            arrival_s=reply.arrival_s,
            weight=w,
            **({"epoch": payload.meta["epoch"]} if "epoch" in payload.meta else {}),
        )
