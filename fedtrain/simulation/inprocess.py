"""In-process engine: N silo trainers in this process, timed on a virtual clock.

Silos train one after another for real (so learning curves are real), while the virtual clock
charges each silo what a deployment would: downlink transfer + its compute (steps × its step time)
+ uplink transfer, all from the actual payload sizes. Replies are yielded in virtual arrival order
(ties by silo order, so aggregation order is deterministic).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.client.trainer import SiloTrainer
from fedtrain.client.worker import SiloWorker
from fedtrain.config import Config
from fedtrain.data.stream import TokenSource, TokenStream
from fedtrain.models.llama import Llama
from fedtrain.protocol.work import TrainWork, Work
from fedtrain.server.engine import Reply
from fedtrain.simulation.clock import SiloTiming, StragglerModel, VirtualClock, profile_step_time
from fedtrain.strategies.registry import spec_for
from fedtrain.transport.faults import FaultPlan, tamper
from fedtrain.transport.payload import decode_payload

__all__ = ["InProcessEngine", "measure_step_time"]

log = logging.getLogger(__name__)


def measure_step_time(model: Llama, cfg: Config, steps: int = 3) -> float:
    """Median seconds per inner step of ``model`` on this machine (on a throwaway copy)."""
    scratch = copy.deepcopy(model)
    stream = TokenStream(
        torch.randint(0, model.vocab_size, (cfg.train.seq_len * 64,)),
        seed=0,
        stream_id="calibration",
    )
    trainer = SiloTrainer("calibration", scratch, stream, cfg.train, total_steps=steps + 1)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train(1)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first step pays one-off allocation costs
    return times[len(times) // 2]


def _stream(cfg: Config, tokens: TokenSource, name: str) -> TokenStream:
    return TokenStream(tokens, cfg.run.seed, name, cfg.data.order, cfg.train.grad_accum)


class InProcessEngine:
    """All silos in one process; virtual time from profiles and payload sizes."""

    def __init__(
        self,
        cfg: Config,
        run_id: str,
        silo_tokens: Sequence[TokenSource],
        model_factory: Callable[[], Llama],
        on_step: Callable[[int], None] | None = None,
        step_time_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.silos = cfg.silo_names()
        self.on_step = on_step
        self.clock = VirtualClock()
        total = cfg.total_inner_steps()
        keys = {
            name: Ed25519PrivateKey.generate() if cfg.transport.sign_updates else None
            for name in self.silos
        }
        spec = spec_for(cfg)
        coded = spec.replicated_shards
        # Coded work replicates the public shards (shard j = silo j's public share); the config
        # refuses coding when any silo has private data.
        shard_streams = [
            TokenStream(t, cfg.run.seed, f"shard{j}") for j, t in enumerate(silo_tokens)
        ]
        self.workers = {
            name: SiloWorker(
                SiloTrainer(name, model_factory(), _stream(cfg, tokens, name), cfg.train, total),
                run_id=run_id,
                transport=cfg.transport,
                seed=cfg.run.seed,
                signing_key=keys[name],
                shards=shard_streams.__getitem__ if coded else None,
            )
            for name, tokens in zip(self.silos, silo_tokens, strict=True)
        }
        self.public_keys = {n: k.public_key() for n, k in keys.items() if k is not None}
        self.signing_keys = keys
        self.faults = FaultPlan.from_specs(
            cfg.faults.inject,
            drop_rate=cfg.faults.drop_rate,
            corrupt_rate=cfg.faults.corrupt_rate,
            seed=cfg.run.seed,
        )
        profiles = cfg.silo_profiles()
        self.measured_step_time_s: float | None = step_time_s
        first = next(iter(self.workers.values())).trainer
        if any(p.step_time_s == 0 and not p.gpu for p in profiles) and step_time_s is None:
            self.measured_step_time_s = measure_step_time(first.model, cfg)
            log.info("measured step time %.4f s", self.measured_step_time_s)
        n_params = sum(t.numel() for t in first.model.parameters())
        self.timing = {
            name: SiloTiming(
                p,
                profile_step_time(p, n_params, cfg.train.tokens_per_step)
                or float(self.measured_step_time_s or 0.0),
                cfg.simulation.step_time_jitter,
                cfg.run.seed,
                name,
            )
            for name, p in zip(self.silos, profiles, strict=True)
        }
        self.stragglers = StragglerModel(cfg, self.silos)
        self.compute_s: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        self.ready_at: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        """Virtual time at which each silo finished its last work (it may train on from there)."""
        self._inflight: list[tuple[float, int, Reply, tuple[float, float, float] | None]] = []
        """Replies not yet taken: (virtual arrival, silo index, reply, (start, end, compute))."""
        self.keep_late = spec.async_replies
        """Semi-async rounds: work in flight at a round's close arrives in a later round."""
        self._backlog: dict[int, bytes | bytearray] = {}
        """Broadcast of round r (keep_late only), until every silo has applied it."""
        self._synced: dict[str, int] = dict.fromkeys(self.silos, 0)
        """Last round whose broadcast each silo applied (keep_late only)."""
        self._round_start: tuple[float, dict[str, float]] = (0.0, dict(self.compute_s))
        self._pending_faults: dict[str, list[Any]] = {}

    def join(self, weights_payload: bytes | bytearray) -> int:
        weights = dict(decode_payload(weights_payload).tensors)
        for worker in self.workers.values():
            worker.trainer.set_global(weights)
        # Joining happens before round 1; charge the slowest download to the clock.
        for name, t in self.timing.items():
            self.ready_at[name] = self.clock.now + t.down_time(len(weights_payload))
        self.clock.advance(max(t.down_time(len(weights_payload)) for t in self.timing.values()))
        return len(weights_payload) * len(self.workers)

    def run_round(
        self,
        round: int,
        work: dict[str, Work],
        downlink: bytes | bytearray | None,
        deadline_s: float,
    ) -> Iterator[Reply]:
        start = self.clock.now
        self._round_start = (start, dict(self.compute_s))
        if self.keep_late and downlink is not None:
            self._backlog[round - 1] = downlink
        sent: list[tuple[float, int, Reply, tuple[float, float, float] | None]] = []
        for idx, name in enumerate(self.silos):
            if name not in work:
                continue
            worker, timing, w = self.workers[name], self.timing[name], work[name]
            down = self._catch_up(name, round) if self.keep_late else downlink
            faults = self.faults.at(name, round) if self.faults else []
            killed = any(f.kind == "kill" for f in faults)
            if self.stragglers.dropped(name, round) or killed:
                # Down for this round: it catches up on the broadcast, sends nothing, and the
                # coordinator hears at once that it is gone (as Flower reports a lost node).
                worker.receive(down)
                self.ready_at[name] = max(self.ready_at[name], start)
                why = "killed (injected fault)" if killed else "dropped out (simulated)"
                self._inflight.append((start, idx, Reply(name, None, 0.0, error=why), None))
                continue
            result = worker.handle(round, w, down, self.on_step)
            # Per-silo timeline: the silo kept computing after its last send; it trains
            # `apply_at` steps (the overlap τ), then needs the broadcast, then finishes.
            per_step = timing.compute_time(1, round) * self.stragglers.slowdown(name, round)
            apply_at = w.apply_at if isinstance(w, TrainWork) else 0
            t = self.ready_at[name] + apply_at * per_step
            if down is not None:
                t = max(t, start + timing.down_time(len(down)))
            busy_from = t - apply_at * per_step
            t += (result.stats.steps - apply_at) * per_step
            arrival = t + timing.up_time(len(result.payload))
            span = (busy_from, t, result.stats.steps * per_step)
            entry = (arrival, idx, Reply(name, result.payload, 0.0), span)
            if faults:
                self._pending_faults[name] = faults
            sent.append(entry)
        self._inflight.extend(self._inject(round, sent) if self.faults else sent)
        self._inflight.sort(key=lambda r: (r[0], r[1]))
        while self._inflight:
            at, _, reply, busy = self._inflight[0]
            if self.keep_late and at - start > deadline_s:
                break  # still in flight: it arrives in a later round
            self._inflight.pop(0)
            # Once taken, the silo's work counts; what is never taken is cancelled when the
            # round closes (see close_round), unless rounds are semi-async.
            if busy is not None:
                self.ready_at[reply.silo] = busy[1]
                self.compute_s[reply.silo] += busy[2]
            yield Reply(reply.silo, reply.payload, at - start, error=reply.error)

    def _inject(
        self, round: int, sent: list[tuple[float, int, Reply, tuple[float, float, float] | None]]
    ) -> list[tuple[float, int, Reply, tuple[float, float, float] | None]]:
        """Replace this round's replies by what the faulty silos send instead."""
        honest = {r.silo: r.payload for _, _, r, _ in sent if r.payload is not None}
        order = [n for n in self.silos if n in honest]
        out: list[tuple[float, int, Reply, tuple[float, float, float] | None]] = []
        for arrival, idx, reply, span in sent:
            name = reply.silo
            assert reply.payload is not None
            previous = self.faults.remember(name, reply.payload)
            faults = self._pending_faults.pop(name, [])
            if any(f.kind == "drop" for f in faults):
                log.info("round %d: %s's reply is lost (injected fault)", round, name)
                continue
            payloads = [reply.payload]
            for f in faults:
                if f.kind == "delay":
                    arrival += f.value
                    continue
                other = order[(order.index(name) + 1) % len(order)] if len(order) > 1 else None
                payloads = [
                    x
                    for p in payloads
                    for x in tamper(
                        f,
                        p,
                        key=self.signing_keys[name],
                        previous=previous,
                        other=honest[other] if other is not None else None,
                    )
                ]
                log.info("round %d: %s sends a faulty reply (%s)", round, name, f.kind)
            out.extend((arrival, idx, Reply(name, p, 0.0), span) for p in payloads)
        return out

    def _catch_up(self, name: str, round: int) -> bytes | bytearray | None:
        """Apply every broadcast ``name`` missed while computing, but the last; return that one
        (the silo applies it as the round's downlink) and charge all of them to its link."""
        worker = self.workers[name]
        missed = [
            self._backlog[r] for r in range(self._synced[name] + 1, round) if r in self._backlog
        ]
        self._synced[name] = round - 1
        for d in missed[:-1]:
            worker.receive(d)
        if len(missed) > 1:  # the earlier ones' transfer time delays the start
            extra = sum(self.timing[name].down_time(len(d)) for d in missed[:-1])
            self.ready_at[name] = max(self.ready_at[name], self.clock.now) + extra
        oldest = min(self._synced.values())
        for r in [r for r in self._backlog if r <= oldest]:
            del self._backlog[r]
        return missed[-1] if missed else None

    def finish(self, downlink: bytes | bytearray | None) -> int:
        """Deliver the last outer update so every silo ends on the final global weights."""
        if downlink is None:
            return 0
        for worker in self.workers.values():
            worker.receive(downlink)
        self.clock.advance(max(t.down_time(len(downlink)) for t in self.timing.values()))
        return len(downlink) * len(self.workers)

    def save_state(self, store: Any, full: bool) -> dict[str, Any]:
        state: dict[str, Any] = {
            "clock": self.clock.now,
            "compute_s": dict(self.compute_s),
            "ready_at": dict(self.ready_at),
            "measured_step_time_s": self.measured_step_time_s,
        }
        if self.keep_late:
            # Work in flight and broadcasts not yet applied are part of the run's state.
            state["inflight"] = [
                [at, idx, r.silo, store.blobs.put(r.payload) if r.payload else None, r.error, b]
                for at, idx, r, b in self._inflight
            ]
            state["backlog"] = {str(r): store.blobs.put(d) for r, d in self._backlog.items()}
            state["synced"] = dict(self._synced)
            blobs = [b[3] for b in state["inflight"] if b[3]] + list(state["backlog"].values())
            state["blobs"] = sorted(set(blobs))
        if full:
            state["silos"] = {
                name: store.put_tensors(*worker.state_tensors())
                for name, worker in self.workers.items()
            }
        return state

    def restore_state(self, store: Any, state: dict[str, Any]) -> None:
        if set(state.get("silos") or {}) != set(self.workers):
            raise ValueError("the checkpoint does not hold every silo's state")
        self.clock.now = float(state["clock"])
        self.compute_s = {k: float(v) for k, v in state["compute_s"].items()}
        self.ready_at = {k: float(v) for k, v in state["ready_at"].items()}
        if self.keep_late:
            self._inflight = [
                (
                    float(at),
                    int(idx),
                    Reply(silo, store.blobs.get(blob) if blob else None, 0.0, error=error),
                    tuple(busy) if busy is not None else None,
                )
                for at, idx, silo, blob, error, busy in state["inflight"]
            ]
            self._backlog = {int(r): store.blobs.get(b) for r, b in state["backlog"].items()}
            self._synced = {k: int(v) for k, v in state["synced"].items()}
        for name, blob in state["silos"].items():
            tensors, meta = store.get_tensors(blob)
            self.workers[name].load_state_tensors(tensors, meta)

    def close_round(self, duration_s: float) -> None:
        """Advance the clock; silos whose replies were not taken stop at the close (the next
        round's message preempts their work) and are charged the compute they did until then."""
        self.clock.advance(duration_s)
        if self.keep_late:
            return
        for _, _, reply, busy in self._inflight:
            if busy is not None:
                busy_from, _, compute = busy
                self.compute_s[reply.silo] += min(compute, max(0.0, self.clock.now - busy_from))
                self.ready_at[reply.silo] = max(self.ready_at[reply.silo], self.clock.now)
        self._inflight = []

    def round_stats(self) -> dict[str, Any]:
        """Compute utilisation (compute time / round time, per silo, capped at 1) and idle time
        of the round just closed."""
        start, before = self._round_start
        span = self.clock.now - start
        if span <= 0:
            return {}
        busy = {n: min(span, self.compute_s[n] - before.get(n, 0.0)) for n in self.silos}
        util = [b / span for b in busy.values()]
        return {
            "utilisation": sum(util) / len(util),
            "utilisation_min": min(util),
            "idle_s": round(sum(span - b for b in busy.values()) / len(busy), 6),
        }

    def sim_time_s(self) -> float | None:
        return round(self.clock.now, 6)

    def utilisation(self) -> float | None:
        """Mean over silos of compute time / elapsed virtual time."""
        if not self.clock.now:
            return None
        return sum(self.compute_s.values()) / len(self.compute_s) / self.clock.now
