"""One silo's protocol side: apply the coordinator's broadcast, do the work, encode the reply.

The worker wraps a :class:`SiloTrainer` with what crosses the wire: the codec settings, the
uplink error-feedback residual (advanced only when the coordinator acknowledges the update) and
the silo's Ed25519 signing key. Every engine (in-process simulation, Flower deployment) drives
silos through this class, so the silo-side protocol exists once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.client.trainer import SiloTrainer, StepStats
from fedtrain.config import TransportSection
from fedtrain.data.stream import TokenStream, derive_seed
from fedtrain.protocol.work import CodedWork, GradWork, TrainWork, Work, ZOWork
from fedtrain.strategies.zo import ZOEntry, encode_byte, replay, spsa, zo_seed
from fedtrain.transport.feedback import ErrorFeedback
from fedtrain.transport.payload import Payload, decode_payload, encode_payload

__all__ = ["SiloWorker", "WorkResult"]

OnStep = Callable[[int], None] | None
"""Called with the number of inner steps just taken (progress)."""
Done = tuple[dict[str, torch.Tensor], StepStats]
"""A handler's result: the reply's tensors and what the silo computed."""


@dataclass(slots=True)
class WorkResult:
    payload: bytes
    """The encoded (and signed, if configured) reply."""
    stats: StepStats
    """What the silo computed."""
    values: int
    """Number of values carried (for compression ratios)."""


class SiloWorker:
    """A silo's side of a round: downlink in, work done, reply out."""

    def __init__(
        self,
        trainer: SiloTrainer,
        *,
        run_id: str,
        transport: TransportSection,
        seed: int,
        signing_key: Ed25519PrivateKey | None = None,
        shards: Callable[[int], TokenStream] | None = None,
    ) -> None:
        self.trainer = trainer
        self.shards = shards
        """Public shard j's token stream (coded work); None for a silo with private data."""
        self.name = trainer.name
        self.run_id = run_id
        self.transport = transport
        self.seed = seed
        self.signing_key = signing_key
        self.feedback = ErrorFeedback() if transport.error_feedback else None
        self.last_downlink: Payload | None = None

    def handle(
        self,
        round: int,
        work: Work,
        downlink: bytes | bytearray | None,
        on_step: Callable[[int], None] | None = None,
    ) -> WorkResult:
        """One round on the silo: train, merge the previous round's result when it is due
        (:attr:`TrainWork.apply_at` steps in: the overlap τ of Streaming DiLoCo; 0 = first),
        finish the work and return the encoded reply."""
        apply_at, alpha = (work.apply_at, work.alpha) if isinstance(work, TrainWork) else (0, 0.0)
        early = self.trainer.train(apply_at, on_step) if apply_at else None
        self.receive(downlink, alpha=alpha)
        rest = dataclasses.replace(work, steps=work.steps - apply_at)
        return self.work(round, rest, on_step, before=early)

    def receive(
        self, downlink: bytes | bytearray | None, coordinator_key: Any = None, alpha: float = 0.0
    ) -> None:
        """Apply the last outer update and settle the error-feedback residual.

        The downlink's ``accepted`` list is the acknowledgement: the residual staged with this
        silo's last update becomes current only if the coordinator counted that update.
        """
        if downlink is None:
            if self.feedback is not None:
                self.feedback.discard()
            return
        update = decode_payload(downlink, public_key=coordinator_key)
        if self.feedback is not None:
            if self.name in update.meta.get("accepted", []):
                self.feedback.commit()
            else:
                self.feedback.discard()
        if update.kind == "broadcast":
            self._replay(update)
        else:
            self.trainer.apply_global_update(dict(update.tensors), alpha=alpha)
        self.last_downlink = update

    def _replay(self, update: Payload) -> None:
        """Zeroth-order round: replay every silo's one-byte codes (same order everywhere)."""
        m = update.meta
        params = [self.trainer.params[n] for n in m["zo_names"]]
        entries = [
            ZOEntry(round=update.round, silo=s, sample=k, code=int(c))
            for s, t in update.tensors.items()
            for k, c in enumerate(t.tolist())
        ]
        replay(
            params,
            entries,
            run_id=self.run_id,
            lr=float(m["zo_lr"]),
            scale=float(m["zo_scale"]),
            kind=str(m["zo_perturbation"]),
        )
        with torch.no_grad():
            for n in m["zo_names"]:
                self.trainer.anchor[n].copy_(self.trainer.params[n])

    def _train(self, round: int, work: TrainWork, on_step: OnStep) -> Done:
        """H inner steps; the reply is the pseudo-gradient of the named parameters."""
        stats = self.trainer.train(work.steps, on_step)
        return self.trainer.pseudo_gradient(work.names), stats

    def _grad(self, round: int, work: GradWork, on_step: OnStep) -> Done:
        """One step's gradient at the current weights."""
        tensors, stats = self.trainer.gradient()
        if on_step is not None:
            on_step(1)
        return tensors, stats

    def _zo(self, round: int, work: ZOWork, on_step: OnStep) -> Done:
        """K projected gradients at the current global θ, each coded in one byte."""
        params = [self.trainer.params[n] for n in work.perturbed]
        model, cfg = self.trainer.model, self.trainer.cfg
        losses: list[float] = []
        grads = []
        for k in range(work.steps):
            xb, yb = self.trainer.stream.batch(self.trainer.step, 0, cfg.batch_size, cfg.seq_len)

            def loss(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> float:
                value = float(model.loss(xb, yb))
                losses.append(value)
                return value

            seed = zo_seed(self.run_id, round, self.name, k)
            grads.append(spsa(params, loss, seed, work.eps, work.perturbation))
            self.trainer.step += 1
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "zo-sr", self.name, round))
        codes = encode_byte(
            torch.tensor(grads, dtype=torch.float64),
            work.scale,
            stochastic=self.transport.stochastic_rounding,
            generator=gen,
        )
        stats = StepStats(
            steps=work.steps,
            tokens=work.steps * cfg.batch_size * cfg.seq_len,
            mean_loss=sum(losses) / max(len(losses), 1),
        )
        return {"codes": codes.to(torch.float32)}, stats

    def _coded(self, round: int, work: CodedWork, on_step: OnStep) -> Done:
        """y_i = Σ_j B_ij·g_j over this silo's shards: each g_j trained from the global start
        with a fresh optimizer and the data order of (round, shard), so every replica of a
        shard computes the same g_j. The silo's own model and optimizer are not touched."""
        if self.shards is None:
            raise ValueError(
                f"silo {self.name} trains on private data: it is never given coded work"
            )
        total: dict[str, torch.Tensor] = {}
        stats: StepStats | None = None
        for j, coeff in zip(work.shards, work.coeffs, strict=True):
            shard = self.trainer.fresh_copy(stream=self.shards(j), step=work.step0)
            done = shard.train(work.steps, on_step)
            stats = done if stats is None else stats.merged(done)
            for n, g in shard.pseudo_gradient(work.names).items():
                if n in total:
                    total[n].add_(g, alpha=coeff)
                else:
                    total[n] = g * coeff
            del shard
        assert stats is not None, "coded work names no shard"
        return total, stats

    def work(
        self,
        round: int,
        work: Work,
        on_step: Callable[[int], None] | None = None,
        before: StepStats | None = None,
    ) -> WorkResult:
        """Run ``work`` and return the encoded reply (``before``: steps already taken)."""
        entry = self.HANDLERS.get(type(work))
        if entry is None:
            kind = getattr(work, "kind", type(work).__name__)
            raise ValueError(f"silo {self.name} cannot run work of kind {kind!r}")
        handler, kind = entry
        tensors, stats = handler(self, round, work, on_step)
        if before is not None:
            stats = before.merged(stats)
        meta = {
            "tokens": stats.tokens,
            "train_loss": stats.mean_loss,
            "steps": stats.steps,
            "silo_step": self.trainer.step,
        }
        stream = self.trainer.stream
        if stream.order == "sequential":
            cfg = self.trainer.cfg
            meta["epoch"] = stream.epoch(self.trainer.step, cfg.batch_size, cfg.seq_len)
        payload = self._encode(tensors, kind, round, meta)
        return WorkResult(
            payload=payload, stats=stats, values=sum(t.numel() for t in tensors.values())
        )

    HANDLERS: ClassVar[dict[type[Work], tuple[Callable[..., Done], str]]] = {
        TrainWork: (_train, "pseudo_grad"),
        CodedWork: (_coded, "pseudo_grad"),
        ZOWork: (_zo, "zo_codes"),
        GradWork: (_grad, "grad"),
    }
    """Each kind of work: its handler ``(self, round, work, on_step) -> (tensors, stats)`` and
    the kind of reply it sends."""

    def _encode(
        self, tensors: dict[str, torch.Tensor], kind: str, round: int, meta: dict[str, Any]
    ) -> bytes:
        t = self.transport
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "sr", self.name, round))
        # One-byte ZO codes travel as they are: exact bytes, no error feedback.
        exact = kind == "zo_codes"
        feedback = None if exact else self.feedback
        send = feedback.compensate(tensors) if feedback is not None else tensors
        payload = encode_payload(
            send,
            codec="code8" if exact else t.codec,
            kind=kind,
            run_id=self.run_id,
            round=round,
            sender=self.name,
            meta=meta,
            stochastic=t.stochastic_rounding,
            generator=gen,
            signing_key=self.signing_key,
            block_size=t.codec_args()["block_size"],
            keep=t.keep,
        )
        if feedback is not None:
            feedback.stage(send, dict(decode_payload(payload).tensors))
        return payload

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The silo's whole state: trainer, plus error feedback (committed and awaiting ack)."""
        tensors, meta = self.trainer.state_tensors()
        if self.feedback is not None:
            tensors.update({f"ef.{n}": t for n, t in self.feedback.residual.items()})
            pending = self.feedback.pending
            if pending is not None:
                tensors.update({f"efp.{n}": t for n, t in pending.items()})
            meta["ef_pending"] = pending is not None
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.trainer.load_state_tensors(tensors, meta)
        if self.feedback is not None:
            self.feedback.load_state_dict(
                {k[3:]: v for k, v in tensors.items() if k.startswith("ef.")}
            )
            if meta.get("ef_pending"):
                self.feedback.set_pending(
                    {k[4:]: v for k, v in tensors.items() if k.startswith("efp.")}
                )
