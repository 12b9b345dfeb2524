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

import torch

from fedtrain.client.trainer import SiloTrainer
from fedtrain.config import Config
from fedtrain.data.stream import TokenStream
from fedtrain.models.llama import Llama
from fedtrain.server.engine import Reply
from fedtrain.simulation.clock import SiloTiming, VirtualClock
from fedtrain.strategies.base import Work
from fedtrain.transport.payload import decode_payload, encode_payload

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
        self.trainers = {
            name: SiloTrainer(
                name, model_factory(), TokenStream(tokens, cfg.run.seed, name), cfg.train, total
            )
            for name, tokens in zip(self.silos, silo_tokens, strict=True)
        }
        profiles = cfg.silo_profiles()
        self.measured_step_time_s: float | None = step_time_s
        if any(p.step_time_s == 0 for p in profiles) and step_time_s is None:
            first = next(iter(self.trainers.values()))
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

    def join(self, weights_payload: bytes) -> int:
        weights = decode_payload(weights_payload).tensors
        for trainer in self.trainers.values():
            trainer.set_global(weights)
        # Joining happens before round 1; charge the slowest download to the clock.
        self.clock.advance(max(t.down_time(len(weights_payload)) for t in self.timing.values()))
        return len(weights_payload) * len(self.trainers)

    def _silo_reply(
        self, name: str, round: int, work: Work, downlink: bytes | None
    ) -> tuple[bytes, float]:
        trainer = self.trainers[name]
        if downlink is not None:
            trainer.apply_global_update(decode_payload(downlink).tensors)
        if work.kind == "train":
            stats = trainer.train(work.steps, self.on_step)
            tensors = trainer.pseudo_gradient(work.names)
            kind = "pseudo_grad"
        elif work.kind == "grad":
            tensors, stats = trainer.gradient()
            if self.on_step:
                self.on_step(1)
            kind = "grad"
        else:
            raise ValueError(f"in-process engine cannot run work of kind {work.kind!r}")
        meta = {
            "tokens": stats.tokens,
            "train_loss": stats.mean_loss,
            "steps": stats.steps,
            "silo_step": trainer.step,
        }
        payload = encode_payload(
            tensors,
            codec=self.cfg.transport.codec,
            kind=kind,
            run_id=self.run_id,
            round=round,
            sender=name,
            meta=meta,
        )
        timing = self.timing[name]
        compute = timing.compute_time(stats.steps, round)
        self.compute_s[name] += compute
        down = timing.down_time(len(downlink)) if downlink is not None else 0.0
        return payload, down + compute + timing.up_time(len(payload))

    def run_round(
        self, round: int, work: dict[str, Work], downlink: bytes | None, deadline_s: float
    ) -> Iterator[Reply]:
        replies = []
        for idx, name in enumerate(self.silos):
            if name not in work:
                continue
            payload, arrival = self._silo_reply(name, round, work[name], downlink)
            replies.append((arrival, idx, Reply(silo=name, payload=payload, arrival_s=arrival)))
        replies.sort(key=lambda r: (r[0], r[1]))
        for _, _, reply in replies:
            yield reply

    def close_round(self, duration_s: float) -> None:
        self.clock.advance(duration_s)

    def sim_time_s(self) -> float | None:
        return round(self.clock.now, 6)
