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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.client.trainer import SiloTrainer
from fedtrain.client.worker import SiloWorker
from fedtrain.config import Config
from fedtrain.data.stream import TokenStream
from fedtrain.models.llama import Llama
from fedtrain.server.engine import Reply
from fedtrain.simulation.clock import SiloTiming, VirtualClock
from fedtrain.strategies.base import Work
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


class InProcessEngine:
    """All silos in one process; virtual time from profiles and payload sizes."""

    def __init__(
        self,
        cfg: Config,
        run_id: str,
        silo_tokens: list[torch.Tensor],
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
        self.workers = {
            name: SiloWorker(
                SiloTrainer(
                    name, model_factory(), TokenStream(tokens, cfg.run.seed, name), cfg.train, total
                ),
                run_id=run_id,
                transport=cfg.transport,
                seed=cfg.run.seed,
                signing_key=keys[name],
            )
            for name, tokens in zip(self.silos, silo_tokens, strict=True)
        }
        self.public_keys = {n: k.public_key() for n, k in keys.items() if k is not None}
        profiles = cfg.silo_profiles()
        self.measured_step_time_s: float | None = step_time_s
        if any(p.step_time_s == 0 for p in profiles) and step_time_s is None:
            first = next(iter(self.workers.values())).trainer
            self.measured_step_time_s = measure_step_time(first.model, cfg)
            log.info("measured step time %.4f s", self.measured_step_time_s)
        self.timing = {
            name: SiloTiming(
                p,
                p.step_time_s or float(self.measured_step_time_s or 0.0),
                cfg.simulation.step_time_jitter,
                cfg.run.seed,
                name,
            )
            for name, p in zip(self.silos, profiles, strict=True)
        }
        self.compute_s: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        self.ready_at: dict[str, float] = dict.fromkeys(self.silos, 0.0)
        """Virtual time at which each silo finished its last work (it may train on from there)."""

    def join(self, weights_payload: bytes) -> int:
        weights = decode_payload(weights_payload).tensors
        for worker in self.workers.values():
            worker.trainer.set_global(weights)
        # Joining happens before round 1; charge the slowest download to the clock.
        for name, t in self.timing.items():
            self.ready_at[name] = self.clock.now + t.down_time(len(weights_payload))
        self.clock.advance(max(t.down_time(len(weights_payload)) for t in self.timing.values()))
        return len(weights_payload) * len(self.workers)

    def run_round(
        self, round: int, work: dict[str, Work], downlink: bytes | None, deadline_s: float
    ) -> Iterator[Reply]:
        start = self.clock.now
        replies = []
        for idx, name in enumerate(self.silos):
            if name not in work:
                continue
            worker, timing, w = self.workers[name], self.timing[name], work[name]
            result = worker.handle(round, w, downlink, self.on_step)
            # Per-silo timeline: the silo kept computing after its last send; it trains
            # `apply_at` steps (the overlap τ), then needs the broadcast, then finishes.
            per_step = timing.compute_time(1, round)
            apply_at = int(w.extra.get("apply_at", 0))
            t = self.ready_at[name] + apply_at * per_step
            if downlink is not None:
                t = max(t, start + timing.down_time(len(downlink)))
            t += (result.stats.steps - apply_at) * per_step
            self.ready_at[name] = t
            self.compute_s[name] += result.stats.steps * per_step
            arrival = t + timing.up_time(len(result.payload)) - start
            replies.append(
                (arrival, idx, Reply(silo=name, payload=result.payload, arrival_s=arrival))
            )
        replies.sort(key=lambda r: (r[0], r[1]))
        for _, _, reply in replies:
            yield reply

    def finish(self, downlink: bytes | None) -> int:
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
        for name, blob in state["silos"].items():
            tensors, meta = store.get_tensors(blob)
            self.workers[name].load_state_tensors(tensors, meta)

    def close_round(self, duration_s: float) -> None:
        self.clock.advance(duration_s)

    def sim_time_s(self) -> float | None:
        return round(self.clock.now, 6)

    def utilisation(self) -> float | None:
        """Mean over silos of compute time / elapsed virtual time."""
        if not self.clock.now:
            return None
        return sum(self.compute_s.values()) / len(self.compute_s) / self.clock.now
