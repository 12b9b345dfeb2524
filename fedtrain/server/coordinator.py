"""The engine-independent coordinator round loop.

Each round: the strategy plans the work, the engine delivers the last outer update plus the
work and yields replies as they arrive; replies are decoded (signature checked when signing is
on), validated and folded into a streaming weighted mean until the close condition or the
deadline; the outer optimizer steps; the outer update δ is encoded with the transport codec
(with the coordinator's own error feedback) and the coordinator applies the SAME decoded δ̂ to
its weights as the silos will, so both hold bitwise-identical weights; the new state is
committed to the run directory before the next round starts. The broadcast carries the list of
silos whose updates counted: that is each silo's acknowledgement for its error feedback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtrain.config import Config
from fedtrain.data.stream import derive_seed
from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama
from fedtrain.protocol.work import TrainWork, Work, work_from_json, work_to_json
from fedtrain.server.closing import close_condition
from fedtrain.server.engine import Engine
from fedtrain.server.validate import UpdateRejected, UpdateValidator
from fedtrain.storage.runstore import RunStore, StoredState
from fedtrain.strategies.base import Strategy
from fedtrain.transport.feedback import ErrorFeedback
from fedtrain.transport.payload import decode_payload, encode_payload

__all__ = ["Coordinator", "RunTotals"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunTotals:
    rounds: int = 0
    rounds_failed: int = 0
    steps: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    """Broadcast updates (and the final one), all silos; excludes the one-off join."""
    bytes_join: int = 0
    """Full fp32 weights sent once to each joining silo."""
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    max_buffer_bytes: int = 0
    stragglers: int = 0
    rejected: int = 0
    values_up: int = 0
    """Values carried by decoded uplink payloads (for the compression ratio vs fp32)."""
    payload_bytes_up: int = 0
    """Bytes of those payloads."""
    values_down: int = 0
    """Values carried by broadcast updates (per copy)."""
    payload_bytes_down: int = 0
    """Bytes of those broadcasts (per copy)."""
    wall_s: float = 0.0
    """Real seconds spent in rounds (summed over restarts)."""
    max_payload_bytes: int = 0
    """Largest single uplink payload (the peak a silo's link must carry per sync)."""
    max_payload_values: int = 0
    """Most values in one decoded uplink payload."""
    strikes: dict[str, int] = field(default_factory=dict)
    """Rejected updates per silo (validation failures, duplicates, unsolicited replies)."""
    quarantined: dict[str, int] = field(default_factory=dict)
    """Silo -> round it was quarantined in (it gets no more work)."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Counters (not the history) for the commit record."""
        return {k: getattr(self, k) for k in self.__slots__ if k != "history"}  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, data: dict[str, Any], history: list[dict[str, Any]]) -> RunTotals:
        return cls(**data, history=history)

    def compression(self) -> dict[str, float | None]:
        """fp32 bytes of the values carried / bytes actually sent, per direction."""
        up = 4 * self.values_up / self.payload_bytes_up if self.payload_bytes_up else None
        down = 4 * self.values_down / self.payload_bytes_down if self.payload_bytes_down else None
        return {"up": up, "down": down}


class Coordinator:
    """Drives rounds over any :class:`~fedtrain.server.engine.Engine`."""

    def __init__(
        self,
        *,
        cfg: Config,
        run_id: str,
        model: Llama,
        strategy: Strategy,
        engine: Engine,
        store: RunStore,
        eval_batch: torch.Tensor,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_round_start: Callable[[int, int], None] | None = None,
        public_keys: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.model = model
        self.params = dict(model.named_parameters())
        self.strategy = strategy
        self.engine = engine
        self.store = store
        self.eval_batch = eval_batch
        self.on_round = on_round
        self.on_round_start = on_round_start
        self.public_keys = public_keys or {}
        if cfg.transport.sign_updates and set(self.public_keys) != set(engine.silos):
            missing = sorted(set(engine.silos) - set(self.public_keys))
            raise ValueError(f"transport.sign_updates is on but silos {missing} have no key")
        self.feedback = ErrorFeedback() if cfg.transport.error_feedback else None
        self.validator = UpdateValidator(
            run_id=run_id,
            params=self.params,
            kind=strategy.reply_kind,
            limits=cfg.reliability,
            public_keys=self.public_keys if cfg.transport.sign_updates else None,
        )
        self.totals = RunTotals()
        self._downlink: bytes | None = None
        self._restored = False
        self._aggregate: dict[str, torch.Tensor] = {}
        self._outstanding: dict[str, tuple[int, Work]] = {}
        """Silo -> (round, work) it was sent and has not answered yet."""

    def evaluate(self) -> float:
        return evaluate_loss(
            self.model, self.eval_batch, self.cfg.train.batch_size, bf16=self.cfg.train.bf16
        )

    def _encode(
        self,
        tensors: dict[str, torch.Tensor],
        kind: str,
        rnd: int,
        codec: str,
        meta: dict[str, Any] | None = None,
    ) -> bytes:
        t = self.cfg.transport
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "sr", "down", rnd))
        return encode_payload(
            tensors,
            codec=codec,
            kind=kind,
            run_id=self.run_id,
            round=rnd,
            sender="coordinator",
            meta=meta,
            block_size=t.block_size,
            stochastic=t.stochastic_rounding,
            generator=gen,
        )

    # ------------------------------------------------------------------ resume
    @torch.no_grad()
    def restore(self, stored: StoredState) -> None:
        """Continue from a committed round: weights, outer state, feedback, broadcast, totals."""
        st = stored.state
        weights, _ = self.store.get_tensors(st["global_blob"])
        for n, p in self.params.items():
            p.copy_(weights[n])
        outer, meta = self.store.get_tensors(st["outer_blob"])
        self.strategy.load_state_tensors(outer, meta)
        if self.feedback is not None and "feedback_blob" in st:
            residual, _ = self.store.get_tensors(st["feedback_blob"])
            self.feedback.load_state_dict(residual)
        self._downlink = self.store.blobs.get(st["downlink_blob"])
        # [round, work] entries; older stores wrote [round, kind, steps, names, extra].
        self._outstanding = {
            s: (int(e[0]), work_from_json(e[1] if len(e) == 2 else e[1:]))
            for s, e in st.get("outstanding", {}).items()
        }
        history = [r for r in self.store.index.metrics() if r["round"] <= stored.round]
        self.totals = RunTotals.from_json(st["totals"], history)
        self.engine.restore_state(self.store, {**st["engine"], "silos": st.get("silos", {})})
        self._restored = True
        self.store.event("resume", round=stored.round, tokens=self.totals.tokens)

    # --------------------------------------------------------------------- run
    def run(self) -> RunTotals:
        t = self.totals
        cfg = self.cfg
        if not self._restored:
            weights = {n: p.detach() for n, p in self.params.items()}
            self.store.index.set_meta("initial_global_blob", self.store.put_tensors(weights))
            # Joining silos get full fp32 weights once; afterwards only encoded updates.
            t.bytes_join = self.engine.join(self._encode(weights, "weights", 0, "fp32"))
            self.store.event("join", silos=self.engine.silos, bytes_down=t.bytes_join)
            t.initial_eval_loss = self.evaluate()
            self.store.event("eval", round=0, eval_loss=t.initial_eval_loss)
            log.info("initial eval loss %.4f", t.initial_eval_loss)
            self._downlink = None
        downlink: bytes | None = self._downlink

        total_steps = cfg.total_inner_steps()
        eval_every = cfg.run.eval_every_tokens or cfg.round_tokens()
        start, wall0 = time.perf_counter(), t.wall_s
        while t.steps < total_steps and (cfg.run.rounds == 0 or t.rounds < cfg.run.rounds):
            rnd = t.rounds + 1
            self.store.start_round(rnd)
            work = self.strategy.plan(rnd, self.engine.silos, total_steps - t.steps)
            # Quarantined silos get no work: to the round they are permanent stragglers.
            work = {s: w for s, w in work.items() if s not in t.quarantined}
            self._outstanding.update({s: (rnd, w) for s, w in work.items()})
            steps = max((w.steps for w in work.values()), default=0)
            if self.on_round_start:
                self.on_round_start(rnd, steps)
            tokens_before = t.tokens
            result = self._round(rnd, work, downlink)
            # Semi-async rounds: the mean steps of the updates taken (silos differ).
            t.steps += result["steps"] if self.strategy.async_replies else steps
            down = len(downlink) * len(work) if downlink else 0
            t.bytes_up += result["bytes_up"]
            t.bytes_down += down
            t.rounds = rnd
            if result["mean"] is None:
                t.rounds_failed += 1
                downlink = None
                self.store.event(
                    "round_failed", round=rnd, valid=result["valid"], min_silos=cfg.round.min_silos
                )
                log.warning(
                    "round %d failed: %d valid updates < quorum %d",
                    rnd,
                    result["valid"],
                    cfg.round.min_silos,
                )
                continue
            self._aggregate = result["mean"]
            downlink = self._outer_step(rnd, result["mean"], result["accepted"])
            t.tokens += result["tokens"]
            last = t.steps >= total_steps or bool(cfg.run.rounds and rnd >= cfg.run.rounds)
            eval_loss = None
            # Evaluate whenever the tokens cross a multiple of eval_every (and at the end).
            if t.tokens // eval_every > tokens_before // eval_every or last:
                eval_loss = self.evaluate()
                t.final_eval_loss = eval_loss
            t.wall_s = round(wall0 + time.perf_counter() - start, 4)
            row = {
                "round": rnd,
                "step": t.steps,
                "tokens": t.tokens,
                "train_loss": result["train_loss"],
                "eval_loss": eval_loss,
                "bytes_up": result["bytes_up"],
                "bytes_down": down,
                "wall_s": t.wall_s,
                "sim_time_s": self.engine.sim_time_s(),
                "silos": result["valid"],
                "stragglers": result["stragglers"],
                "rejected": result["rejected"],
                "round_time_s": result["duration"],
                "buffer_bytes": result["buffer_bytes"],
                "codec": cfg.transport.codec,
                "compression_up": result["compression_up"],
                "fragment": next(
                    (w.fragment if isinstance(w, TrainWork) else None for w in work.values()), None
                ),
                "max_payload_bytes": result["max_payload_bytes"],
                "decode_error": result["decode_error"],
                "quarantined": len(t.quarantined),
            }
            stats = getattr(self.engine, "round_stats", None)
            if stats is not None:
                row.update(stats())
            self._commit(rnd, row, downlink, last)
            t.history.append(row)
            if self.on_round:
                self.on_round(row)
        final = self.engine.finish(downlink)
        t.bytes_down += final
        self.store.event("finish", bytes_down=final)
        return t

    def _round(self, rnd: int, work: dict[str, Work], downlink: bytes | None) -> dict[str, Any]:
        cfg = self.cfg
        t = self.totals
        timeout = cfg.round.timeout_s
        closer = close_condition(cfg.round)
        agg = self.strategy.new_aggregator()
        expected = len(self._outstanding)
        started_at = self.engine.sim_time_s()
        t0 = started_at if started_at is not None else time.time()
        steps_taken: list[int] = []
        valid = seen = stragglers = rejected = bytes_up = tokens = 0
        values = decoded_bytes = max_payload = max_values = 0
        loss_sum = loss_w = 0.0
        last_arrival = 0.0
        accepted: list[str] = []
        closed = False
        replies: dict[str, int] = {}
        for reply in self.engine.run_round(rnd, work, downlink, timeout):
            n_sent = replies[reply.silo] = replies.get(reply.silo, 0) + 1
            seen += n_sent == 1
            size = len(reply.payload or b"")
            bytes_up += size
            max_payload = max(max_payload, size)
            reason: str | None = None
            strike = True
            # One update per silo per round: a repeat never takes (or counts) the work again.
            sent_round, sent = (
                (rnd, None)
                if n_sent > 1
                else self._outstanding.pop(reply.silo, (rnd, work.get(reply.silo)))
            )
            if n_sent > 1:
                reason = f"duplicate: reply {n_sent} from {reply.silo} in round {rnd}"
            elif reply.silo in t.quarantined:
                reason = f"silo quarantined in round {t.quarantined[reply.silo]}"
                strike = False
            elif reply.arrival_s > timeout:
                strike = False
                stragglers += 1
                reason = f"straggler: arrived at {reply.arrival_s:.3f}s > {timeout}s"
                self.store.event(
                    "straggler",
                    round=rnd,
                    silo=reply.silo,
                    arrival_s=reply.arrival_s,
                    timeout_s=timeout,
                )
            elif sent is None:
                reason = "reply from a silo that was sent no work"
            elif reply.error is not None or reply.payload is None:
                rejected += 1
                reason = f"silo failed: {reply.error}"
                strike = False
                self.store.event("failed", round=rnd, silo=reply.silo, reason=reply.error)
                log.warning("silo %s failed in round %d: %s", reply.silo, rnd, reply.error)
            else:
                try:
                    payload = self.validator.check(
                        reply.payload,
                        silo=reply.silo,
                        round=sent_round,
                        names=sent.names,
                        shapes=sent.reply_shapes(),
                    )
                except UpdateRejected as e:
                    reason = str(e)
            if n_sent == 1:
                self.strategy.received(reply.silo, t0 + reply.arrival_s, reason is None)
            if reason is not None:
                if strike:
                    rejected += 1
                    self._strike(rnd, reply.silo, reason)
                # Kept for debugging, marked invalid with the reason.
                self.store.store_update(
                    rnd,
                    reply.silo if n_sent == 1 else f"{reply.silo}#{n_sent}",
                    reply.payload,
                    valid=False,
                    reason=reason,
                    codec=None,
                    weight=None,
                )
                if closer.should_close(valid, seen, expected):
                    # The last expected reply was a bad one: the round is complete now.
                    last_arrival = max(last_arrival, min(reply.arrival_s, timeout))
                    closed = True
                    break
                continue
            w = self.strategy.weight(payload.meta)
            staleness = rnd - sent_round
            agg.add(
                payload.tensors, w, sender=reply.silo, meta={**payload.meta, "staleness": staleness}
            )
            steps_taken.append(int(payload.meta.get("steps", 0)))
            self.store.store_update(
                rnd,
                reply.silo,
                reply.payload,
                valid=True,
                reason=None,
                codec=payload.codec,
                weight=w,
            )
            valid += 1
            accepted.append(reply.silo)
            values += payload.numel
            max_values = max(max_values, payload.numel)
            decoded_bytes += size
            n_tok = int(payload.meta.get("tokens", 0))
            tokens += n_tok
            loss_sum += float(payload.meta.get("train_loss", math.nan)) * n_tok
            loss_w += n_tok
            last_arrival = max(last_arrival, reply.arrival_s)
            self.store.event(
                "reply",
                round=rnd,
                silo=reply.silo,
                bytes_up=size,
                bytes_down=len(downlink) if downlink else 0,
                codec=payload.codec,
                tokens=n_tok,
                train_loss=payload.meta.get("train_loss"),
                arrival_s=reply.arrival_s,
                weight=w,
            )
            if agg.done() or closer.should_close(valid, seen, expected):
                closed = True
                break
        duration = last_arrival if closed else timeout
        self.engine.close_round(duration)
        if not self.strategy.async_replies:
            for silo in list(self._outstanding):
                # Its reply is no longer needed (or never came): discarded as a straggler.
                del self._outstanding[silo]
                stragglers += 1
                self.store.event(
                    "straggler", round=rnd, silo=silo, reason="round closed before its reply"
                )
        tokens = agg.tokens(tokens)
        # A decodable coded round holds every shard's update whatever the count of replies.
        mean = agg.mean() if valid >= cfg.round.min_silos or agg.done() else None
        report = agg.report()
        if report:
            self.store.event("aggregate", round=rnd, **report)
            if not report.get("decode_exact", True):
                log.warning(
                    "round %d: arrivals do not decode exactly; approximate sum, error %.3g",
                    rnd,
                    report["decode_error"],
                )
        t.stragglers += stragglers
        t.rejected += rejected
        t.values_up += values
        t.payload_bytes_up += decoded_bytes
        t.max_buffer_bytes = max(t.max_buffer_bytes, agg.buffer_bytes)
        t.max_payload_bytes = max(t.max_payload_bytes, max_payload)
        t.max_payload_values = max(t.max_payload_values, max_values)
        return {
            "mean": mean,
            "steps": round(sum(steps_taken) / len(steps_taken)) if steps_taken else 0,
            "decode_error": report.get("decode_error"),
            "valid": valid,
            "accepted": accepted,
            "tokens": tokens,
            "train_loss": loss_sum / loss_w if loss_w else None,
            "bytes_up": bytes_up,
            "stragglers": stragglers,
            "rejected": rejected,
            "duration": duration,
            "buffer_bytes": agg.buffer_bytes,
            "compression_up": 4 * values / decoded_bytes if decoded_bytes else None,
            "max_payload_bytes": max_payload,
        }

    def _strike(self, rnd: int, silo: str, reason: str) -> None:
        """Record a rejected update; quarantine the silo at ``reliability.quarantine_after``."""
        t = self.totals
        t.strikes[silo] = t.strikes.get(silo, 0) + 1
        self.store.event("rejected", round=rnd, silo=silo, reason=reason, strike=t.strikes[silo])
        log.warning("rejected update from %s in round %d: %s", silo, rnd, reason)
        limit = self.cfg.reliability.quarantine_after
        if limit and t.strikes[silo] >= limit and silo not in t.quarantined:
            t.quarantined[silo] = rnd
            self.store.event("quarantined", round=rnd, silo=silo, strikes=t.strikes[silo])
            log.warning(
                "silo %s quarantined after %d rejected updates: it gets no more work",
                silo,
                t.strikes[silo],
            )
            active = len(self.engine.silos) - len(t.quarantined)
            if active < self.cfg.round.min_silos:
                log.error(
                    "only %d silos remain out of quarantine, fewer than round.min_silos = %d: "
                    "the remaining rounds cannot commit",
                    active,
                    self.cfg.round.min_silos,
                )

    @torch.no_grad()
    def _outer_step(self, rnd: int, mean: dict[str, torch.Tensor], accepted: list[str]) -> bytes:
        """Outer step, then replace θ by θ_old + δ̂ (the decoded broadcast update)."""
        codec = self.strategy.broadcast_codec
        if codec is not None:
            # The round's replies ARE the broadcast; every party applies them itself.
            with torch.enable_grad():
                self.strategy.step(mean, rnd)
            downlink = self._encode(
                mean,
                "broadcast",
                rnd,
                codec,
                meta={"accepted": accepted, **self.strategy.broadcast(rnd)},
            )
            self.totals.values_down += sum(v.numel() for v in mean.values())
            self.totals.payload_bytes_down += len(downlink)
            return downlink
        names = self.strategy.update_names(rnd) or list(self.params)
        old = {n: self.params[n].detach().clone() for n in names}
        with torch.enable_grad():
            self.strategy.step(mean, rnd)
        delta = {n: self.params[n].detach() - old[n] for n in names}
        send = self.feedback.compensate(delta) if self.feedback is not None else delta
        downlink = self._encode(
            send, "update", rnd, self.cfg.transport.codec, meta={"accepted": accepted}
        )
        decoded = decode_payload(downlink).tensors
        if self.feedback is not None:
            self.feedback.stage(send, decoded)
            self.feedback.commit()  # the coordinator's own broadcast always counts
        for n in names:
            self.params[n].copy_(old[n] + decoded[n])
        self.totals.values_down += sum(v.numel() for v in decoded.values())
        self.totals.payload_bytes_down += len(downlink)
        return downlink

    def _commit(self, rnd: int, row: dict[str, Any], downlink: bytes, last: bool) -> None:
        """Write the new state's blobs, then mark the round committed in one transaction."""
        store = self.store
        outer, outer_meta = self.strategy.state_tensors()
        state: dict[str, Any] = {
            "run_id": self.run_id,
            "global_blob": store.put_tensors({n: p.detach() for n, p in self.params.items()}),
            "outer_blob": store.put_tensors(outer, outer_meta),
            "aggregate_blob": store.put_tensors(self._aggregate),
            "downlink_blob": store.blobs.put(downlink),
            "totals": self.totals.to_json(),
            "outstanding": {s: [r, work_to_json(w)] for s, (r, w) in self._outstanding.items()},
        }
        if self.feedback is not None:
            state["feedback_blob"] = store.put_tensors(self.feedback.state_dict())
        full = last or rnd % self.cfg.storage.checkpoint_every == 0
        state["engine"] = self.engine.save_state(store, full)
        if "silos" in state["engine"]:
            state["silos"] = state["engine"].pop("silos")
            state["engine"]["has_silos"] = True
        store.commit(rnd, state, row)
