"""The engine-independent coordinator round loop.

Each round: the strategy plans the work, the engine delivers the last outer update plus the
work and yields replies as they arrive; replies are decoded, validated and folded into a
streaming weighted mean until the close condition or the deadline; the outer optimizer steps;
the outer update δ is encoded with the transport codec and the coordinator applies the SAME
decoded δ̂ to its weights as the silos will (so both hold identical weights); the new state is
committed to the run directory before the next round starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtrain.client.trainer import evaluate_loss
from fedtrain.config import Config
from fedtrain.models.llama import Llama
from fedtrain.server.aggregate import StreamingMean
from fedtrain.server.closing import close_condition
from fedtrain.server.engine import Engine
from fedtrain.server.validate import UpdateRejected, validate_update
from fedtrain.storage.rundir import RunDir
from fedtrain.strategies.base import Strategy
from fedtrain.transport.payload import PayloadError, decode_payload, encode_payload

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
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    max_buffer_bytes: int = 0
    stragglers: int = 0
    rejected: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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
        run_dir: RunDir,
        eval_batch: torch.Tensor,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_round_start: Callable[[int, int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.model = model
        self.params = dict(model.named_parameters())
        self.strategy = strategy
        self.engine = engine
        self.run_dir = run_dir
        self.eval_batch = eval_batch
        self.on_round = on_round
        self.on_round_start = on_round_start
        self.codec = cfg.transport.codec
        self.totals = RunTotals()

    def evaluate(self) -> float:
        return evaluate_loss(
            self.model, self.eval_batch, self.cfg.train.batch_size, bf16=self.cfg.train.bf16
        )

    def _encode(self, tensors: dict[str, torch.Tensor], kind: str, round: int, codec: str) -> bytes:
        return encode_payload(
            tensors, codec=codec, kind=kind, run_id=self.run_id, round=round, sender="coordinator"
        )

    # --------------------------------------------------------------------- run
    def run(self) -> RunTotals:
        t = self.totals
        cfg = self.cfg
        weights = {n: p.detach() for n, p in self.params.items()}
        join_bytes = self.engine.join(self._encode(weights, "weights", 0, "fp32"))
        self.run_dir.event("join", silos=self.engine.silos, bytes_down=join_bytes)
        t.initial_eval_loss = self.evaluate()
        self.run_dir.event("eval", round=0, eval_loss=t.initial_eval_loss)
        log.info("initial eval loss %.4f", t.initial_eval_loss)

        total_steps = cfg.total_inner_steps()
        eval_every = cfg.run.eval_every_tokens or cfg.round_tokens()
        next_eval = eval_every
        pending_down = join_bytes
        downlink: bytes | None = None
        start = time.perf_counter()
        while t.steps < total_steps and (cfg.run.rounds == 0 or t.rounds < cfg.run.rounds):
            rnd = t.rounds + 1
            work = self.strategy.plan(rnd, self.engine.silos, total_steps - t.steps)
            steps = max(w.steps for w in work.values())
            if self.on_round_start:
                self.on_round_start(rnd, steps)
            result = self._round(rnd, work, downlink)
            t.steps += steps
            down = pending_down + (len(downlink) * len(work) if downlink else 0)
            pending_down = 0
            t.bytes_up += result["bytes_up"]
            t.bytes_down += down
            t.rounds = rnd
            if result["mean"] is None:
                t.rounds_failed += 1
                downlink = None
                self.run_dir.event(
                    "round_failed", round=rnd, valid=result["valid"], min_silos=cfg.round.min_silos
                )
                log.warning(
                    "round %d failed: %d valid updates < quorum %d",
                    rnd,
                    result["valid"],
                    cfg.round.min_silos,
                )
                continue
            downlink = self._outer_step(rnd, result["mean"])
            t.tokens += result["tokens"]
            last = t.steps >= total_steps or (cfg.run.rounds and rnd >= cfg.run.rounds)
            eval_loss = None
            if t.tokens >= next_eval or last:
                eval_loss = self.evaluate()
                t.final_eval_loss = eval_loss
                while next_eval <= t.tokens:
                    next_eval += eval_every
            row = {
                "round": rnd,
                "step": t.steps,
                "tokens": t.tokens,
                "train_loss": result["train_loss"],
                "eval_loss": eval_loss,
                "bytes_up": result["bytes_up"],
                "bytes_down": down,
                "wall_s": round(time.perf_counter() - start, 4),
                "sim_time_s": self.engine.sim_time_s(),
                "silos": result["valid"],
                "stragglers": result["stragglers"],
                "rejected": result["rejected"],
                "round_time_s": result["duration"],
                "buffer_bytes": result["buffer_bytes"],
            }
            self._commit(rnd, row)
            t.history.append(row)
            if self.on_round:
                self.on_round(row)
        return t

    def _round(self, rnd: int, work: dict, downlink: bytes | None) -> dict[str, Any]:
        cfg = self.cfg
        timeout = cfg.round.timeout_s
        closer = close_condition(cfg.round)
        agg = StreamingMean()
        valid = seen = stragglers = rejected = bytes_up = tokens = 0
        loss_sum = loss_w = 0.0
        last_arrival = 0.0
        closed = False
        for reply in self.engine.run_round(rnd, work, downlink, timeout):
            seen += 1
            size = len(reply.payload or b"")
            bytes_up += size
            if reply.arrival_s > timeout:
                stragglers += 1
                self.run_dir.event(
                    "straggler",
                    round=rnd,
                    silo=reply.silo,
                    arrival_s=reply.arrival_s,
                    timeout_s=timeout,
                )
                continue
            if reply.error is not None or reply.payload is None:
                rejected += 1
                self.run_dir.event("failed", round=rnd, silo=reply.silo, reason=reply.error)
                log.warning("silo %s failed in round %d: %s", reply.silo, rnd, reply.error)
                continue
            try:
                payload = decode_payload(reply.payload)
                validate_update(
                    payload,
                    run_id=self.run_id,
                    round=rnd,
                    silo=reply.silo,
                    kind=self.strategy.reply_kind,
                    params=self.params,
                )
            except (PayloadError, UpdateRejected) as e:
                rejected += 1
                self.run_dir.event("rejected", round=rnd, silo=reply.silo, reason=str(e))
                log.warning("rejected update from %s in round %d: %s", reply.silo, rnd, e)
                continue
            w = self.strategy.weight(payload.meta)
            agg.add(payload.tensors, w)
            valid += 1
            n_tok = int(payload.meta.get("tokens", 0))
            tokens += n_tok
            loss_sum += float(payload.meta.get("train_loss", math.nan)) * n_tok
            loss_w += n_tok
            last_arrival = max(last_arrival, reply.arrival_s)
            self.run_dir.event(
                "reply",
                round=rnd,
                silo=reply.silo,
                bytes_up=size,
                tokens=n_tok,
                train_loss=payload.meta.get("train_loss"),
                arrival_s=reply.arrival_s,
                weight=w,
            )
            if closer.should_close(valid, seen, len(work)):
                closed = True
                break
        duration = last_arrival if closed else timeout
        self.engine.close_round(duration)
        self.totals.stragglers += stragglers
        self.totals.rejected += rejected
        self.totals.max_buffer_bytes = max(self.totals.max_buffer_bytes, agg.buffer_bytes)
        ok = valid >= cfg.round.min_silos
        return {
            "mean": agg.mean() if ok else None,
            "valid": valid,
            "tokens": tokens,
            "train_loss": loss_sum / loss_w if loss_w else None,
            "bytes_up": bytes_up,
            "stragglers": stragglers,
            "rejected": rejected,
            "duration": duration,
            "buffer_bytes": agg.buffer_bytes,
        }

    @torch.no_grad()
    def _outer_step(self, rnd: int, mean: dict[str, torch.Tensor]) -> bytes:
        """Outer step, then replace θ by θ_old + δ̂ (the decoded broadcast update)."""
        old = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.enable_grad():
            self.strategy.step(mean, rnd)
        delta = {n: p.detach() - old[n] for n, p in self.params.items()}
        downlink = self._encode(delta, "update", rnd, self.codec)
        decoded = decode_payload(downlink).tensors
        for n, p in self.params.items():
            p.copy_(old[n] + decoded[n])
        return downlink

    def _commit(self, rnd: int, row: dict[str, Any]) -> None:
        every = self.cfg.storage.checkpoint_every
        last = self.totals.steps >= self.cfg.total_inner_steps()
        if rnd % every == 0 or last:
            outer, outer_meta = self.strategy.state_tensors()
            self.run_dir.save_checkpoint(
                f"round_{rnd:06d}",
                {"global": {n: p.detach() for n, p in self.params.items()}, "outer": outer},
                {
                    "round": rnd,
                    "run_id": self.run_id,
                    "steps": self.totals.steps,
                    "tokens": self.totals.tokens,
                    "outer": outer_meta,
                },
            )
        self.run_dir.metric(row)
        self.run_dir.event("commit", round=rnd, tokens=row["tokens"], eval_loss=row["eval_loss"])
