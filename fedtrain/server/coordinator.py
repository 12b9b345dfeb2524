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
import time
from collections.abc import Callable
from typing import Any

import torch

from fedtrain.aggregation.mean import Aggregator
from fedtrain.config import Config
from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama
from fedtrain.protocol.work import Work, work_from_json, work_to_json
from fedtrain.runtime.memory import limit_heap_fragmentation
from fedtrain.server.closing import close_condition
from fedtrain.server.engine import Engine
from fedtrain.server.outer import coordinator_writer, outer_step_in_parts
from fedtrain.server.residual import StoredResidual
from fedtrain.server.round import RoundIntake, RoundLedger, RoundResult
from fedtrain.server.totals import RunTotals
from fedtrain.server.validate import UpdateValidator
from fedtrain.storage.runstore import RunStore, StoredState
from fedtrain.strategies.base import Strategy

__all__ = ["Coordinator", "RunTotals"]

log = logging.getLogger(__name__)


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
        self.feedback = StoredResidual(store) if cfg.transport.error_feedback else None
        self.validator = UpdateValidator(
            run_id=run_id,
            params=self.params,
            kind=strategy.reply_kind,
            limits=cfg.reliability,
            public_keys=self.public_keys if cfg.transport.sign_updates else None,
        )
        self.totals = RunTotals()
        self._downlink: bytes | bytearray | None = None
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
    ) -> bytearray:
        writer = coordinator_writer(self.cfg, self.run_id, tensors, kind, rnd, codec, meta)
        for n in writer.names:
            writer.write(n, tensors[n])
        return writer.finish()

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
        if self.feedback is not None and "feedback_blobs" in st:
            self.feedback.restore(st["feedback_blobs"])
        elif self.feedback is not None and "feedback_blob" in st:  # committed before per-tensor
            self.feedback.restore_tensors(self.store.get_tensors(st["feedback_blob"])[0])
        self._downlink = self.store.blobs.get(st["downlink_blob"])
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
        """Join the silos (unless resumed), run rounds until the steps or rounds are spent."""
        t, cfg = self.totals, self.cfg
        limit_heap_fragmentation()  # replies decoded tensor by tensor, for hundreds of rounds
        if not self._restored:
            self._join()
        downlink: bytes | bytearray | None = self._downlink
        total_steps = cfg.total_inner_steps()
        start, wall0 = time.perf_counter(), t.wall_s
        while t.steps < total_steps and (cfg.run.rounds == 0 or t.rounds < cfg.run.rounds):
            downlink = self._run_round(t.rounds + 1, downlink, total_steps, start, wall0)
        final = self.engine.finish(downlink)
        t.bytes_down += final
        self.store.event("finish", bytes_down=final)
        return t

    def _join(self) -> None:
        t = self.totals
        weights = {n: p.detach() for n, p in self.params.items()}
        self.store.index.set_meta("initial_global_blob", self.store.put_tensors(weights))
        # Joining silos get full fp32 weights once; afterwards only encoded updates.
        t.bytes_join = self.engine.join(self._encode(weights, "weights", 0, "fp32"))
        self.store.event("join", silos=self.engine.silos, bytes_down=t.bytes_join)
        t.initial_eval_loss = self.evaluate()
        self.store.event("eval", round=0, eval_loss=t.initial_eval_loss)
        log.info("initial eval loss %.4f", t.initial_eval_loss)
        self._downlink = None

    def _run_round(
        self,
        rnd: int,
        downlink: bytes | bytearray | None,
        total_steps: int,
        start: float,
        wall0: float,
    ) -> bytes | bytearray | None:
        """Plan, run and commit round ``rnd``; return the next downlink (None: it failed)."""
        t, cfg = self.totals, self.cfg
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
        t.steps += result.steps if self.strategy.async_replies else steps
        down = len(downlink) * len(work) if downlink else 0
        t.bytes_up += result.bytes_up
        t.bytes_down += down
        t.rounds = rnd
        if result.mean is None:
            t.rounds_failed += 1
            self.store.event(
                "round_failed", round=rnd, valid=result.valid, min_silos=cfg.round.min_silos
            )
            log.warning(
                "round %d failed: %d valid updates < quorum %d",
                rnd,
                result.valid,
                cfg.round.min_silos,
            )
            return None
        self._aggregate = result.mean
        downlink = self._outer_step(rnd, result.mean, result.accepted)
        t.tokens += result.tokens
        last = t.steps >= total_steps or bool(cfg.run.rounds and rnd >= cfg.run.rounds)
        eval_loss = None
        eval_every = cfg.run.eval_every_tokens or cfg.round_tokens()
        # Evaluate whenever the tokens cross a multiple of eval_every (and at the end).
        if t.tokens // eval_every > tokens_before // eval_every or last:
            eval_loss = self.evaluate()
            t.final_eval_loss = eval_loss
        t.wall_s = round(wall0 + time.perf_counter() - start, 4)
        row = result.metrics_row(
            rnd=rnd,
            totals=t,
            work=work,
            eval_loss=eval_loss,
            bytes_down=down,
            sim_time_s=self.engine.sim_time_s(),
            codec=cfg.transport.codec,
        )
        row.update(self.engine.round_stats())
        self._commit(rnd, row, downlink, last)
        t.history.append(row)
        if self.on_round:
            self.on_round(row)
        return downlink

    # ------------------------------------------------------------------- round
    def _round(
        self, rnd: int, work: dict[str, Work], downlink: bytes | bytearray | None
    ) -> RoundResult:
        """Deliver the work, take replies until the round closes, aggregate what counted."""
        timeout = self.cfg.round.timeout_s
        closer = close_condition(self.cfg.round)
        agg = self.strategy.new_aggregator()
        expected = len(self._outstanding)
        started_at = self.engine.sim_time_s()
        t0 = started_at if started_at is not None else time.time()
        intake = RoundIntake(
            rnd=rnd,
            work=work,
            downlink=downlink,
            outstanding=self._outstanding,
            quarantined=self.totals.quarantined,
            timeout_s=timeout,
            t0=t0,
            validator=self.validator,
            strategy=self.strategy,
            store=self.store,
            agg=agg,
            strike=self._strike,
        )
        led, closed = intake.led, False
        for reply in self.engine.run_round(rnd, work, downlink, timeout):
            counted, arrival = intake.take(reply), reply.arrival_s
            del reply  # folded: its bytes go before the engine brings the next one
            if counted:
                if agg.done() or closer.should_close(led.valid, led.seen, expected):
                    closed = True
                    break
            elif closer.should_close(led.valid, led.seen, expected):
                # The last expected reply was a bad one: the round is complete now.
                led.last_arrival = max(led.last_arrival, min(arrival, timeout))
                closed = True
                break
        duration = led.last_arrival if closed else timeout
        self.engine.close_round(duration)
        if not self.strategy.async_replies:
            for silo in list(self._outstanding):
                # Its reply is no longer needed (or never came): discarded as a straggler.
                del self._outstanding[silo]
                led.stragglers += 1
                self.store.event(
                    "straggler", round=rnd, silo=silo, reason="round closed before its reply"
                )
        return self._close(rnd, agg, led, duration)

    def _close(self, rnd: int, agg: Aggregator, led: RoundLedger, duration: float) -> RoundResult:
        """Aggregate what counted, add the round's counters to the totals."""
        t = self.totals
        tokens = agg.tokens(led.tokens)
        # A decodable coded round holds every shard's update whatever the count of replies.
        mean = agg.mean() if led.valid >= self.cfg.round.min_silos or agg.done() else None
        report = agg.report()
        if report:
            self.store.event("aggregate", round=rnd, **report)
            if not report.get("decode_exact", True):
                log.warning(
                    "round %d: arrivals do not decode exactly; approximate sum, error %.3g",
                    rnd,
                    report["decode_error"],
                )
        t.stragglers += led.stragglers
        t.rejected += led.rejected
        t.values_up += led.values
        t.payload_bytes_up += led.decoded_bytes
        t.max_buffer_bytes = max(t.max_buffer_bytes, agg.buffer_bytes)
        t.max_payload_bytes = max(t.max_payload_bytes, led.max_payload)
        t.max_payload_values = max(t.max_payload_values, led.max_values)
        return RoundResult.of(
            led,
            mean=mean,
            tokens=tokens,
            decode_error=report.get("decode_error"),
            duration=duration,
            buffer_bytes=agg.buffer_bytes,
        )

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
    def _outer_step(
        self, rnd: int, mean: dict[str, torch.Tensor], accepted: list[str]
    ) -> bytes | bytearray:
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
        parts = self.strategy.outer_parts(rnd)
        like = {n: self.params[n] for part in parts for n in part}
        codec = self.cfg.transport.codec
        meta = {"accepted": accepted}
        writer = coordinator_writer(self.cfg, self.run_id, like, "update", rnd, codec, meta)
        downlink = outer_step_in_parts(self.strategy, self.params, mean, rnd, writer, self.feedback)
        self.totals.values_down += sum(p.numel() for p in like.values())
        self.totals.payload_bytes_down += len(downlink)
        return downlink

    def _commit(
        self, rnd: int, row: dict[str, Any], downlink: bytes | bytearray, last: bool
    ) -> None:
        """Write the new state's blobs, then mark the round committed in one transaction."""
        store = self.store
        # The live tensors, streamed to the blobs as they are (no model-sized copies).
        outer, outer_meta = self.strategy.state_tensors(copy=False)
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
            state["feedback_blobs"] = self.feedback.state()  # written during the outer step
        full = last or rnd % self.cfg.storage.checkpoint_every == 0
        state["engine"] = self.engine.save_state(store, full)
        if "silos" in state["engine"]:
            state["silos"] = state["engine"].pop("silos")
            state["engine"]["has_silos"] = True
        store.commit(rnd, state, row, aggregate=self._aggregate)
        self._aggregate = {}  # stored; not held through the next round
