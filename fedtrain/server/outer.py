"""The coordinator's outer step, a part at a time, in memory bounded by the largest tensor.

θ ← θ_old + δ̂ where δ = outer_step(θ_old, mean) − θ_old and δ̂ the decoded broadcast (with the
coordinator's error feedback: δ̂ = C(δ + e), e ← δ + e − δ̂). The strategy steps its parameters
in parts (:meth:`~fedtrain.strategies.base.Strategy.outer_parts`; one parameter each for SGD
outer optimizers); each part's old values, δ, compensated δ and decoded δ̂ exist only while that
part is done, and δ is encoded straight into the broadcast's preallocated buffer. The result
is bitwise what stepping everything at once and then encoding the whole δ gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedtrain.config import Config
from fedtrain.data.stream import derive_seed
from fedtrain.server.residual import StoredResidual
from fedtrain.strategies.base import Strategy
from fedtrain.transport.framing import PayloadWriter

__all__ = ["coordinator_writer", "outer_step_in_parts"]


def coordinator_writer(
    cfg: Config,
    run_id: str,
    like: Mapping[str, torch.Tensor],
    kind: str,
    rnd: int,
    codec: str,
    meta: dict[str, Any] | None = None,
) -> PayloadWriter:
    """A payload from the coordinator for tensors shaped like ``like`` (its stochastic
    rounding seeded by the run seed and round, as every party can reproduce)."""
    t = cfg.transport
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "sr", "down", rnd))
    return PayloadWriter(
        like,
        codec=codec,
        kind=kind,
        run_id=run_id,
        round=rnd,
        sender="coordinator",
        meta=meta,
        stochastic=t.stochastic_rounding,
        generator=gen,
        block_size=t.codec_args()["block_size"],
        keep=t.keep,
    )


@torch.no_grad()
def outer_step_in_parts(
    strategy: Strategy,
    params: dict[str, torch.nn.Parameter],
    mean: dict[str, torch.Tensor],
    rnd: int,
    writer: PayloadWriter,
    feedback: StoredResidual | None,
) -> bytearray:
    """Step, encode δ (compensated by ``feedback``) into ``writer``, apply δ̂; the broadcast.

    ``writer`` was made for exactly the parameters of ``strategy.outer_parts(rnd)``, in order.
    The coordinator's own broadcast always counts, so each tensor's new residual replaces the
    old one at once, in the run store (no residual is held in memory).
    """
    for part in strategy.outer_parts(rnd):
        old = {n: params[n].detach().clone() for n in part}
        with torch.enable_grad():
            strategy.step_part(mean, rnd, part)
        for n in part:
            p = params[n]
            delta = p.detach() - old[n]
            send = feedback.compensate(n, delta) if feedback is not None else delta
            del delta
            body = writer.write(n, send)
            decoded = writer.codec.decode(body, send.numel()).reshape(send.shape)
            if feedback is not None:
                feedback.replace(n, send, decoded)
            del send
            p.copy_(old.pop(n) + decoded)
    return writer.finish()
