"""Error feedback (EF-SGD; Seide et al. 2014, Karimireddy et al. 2019) with acknowledged commits.

The sender keeps a residual e (init 0), sends c_t = C(g_t + e_{t−1}) and keeps
e_t = g_t + e_{t−1} − c_t, so Σ c_t = Σ g_t − e_T: nothing is lost, only delayed. The new
residual is STAGED when a payload is encoded and becomes current only on :meth:`commit` — when
the receiver acknowledged the update. A dropped, rejected or straggling update is
:meth:`discard`-ed and the residual stays where it was.
"""

from __future__ import annotations

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Per-tensor residuals of one sender."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    def compensate(self, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """u = g + e for every tensor in ``g`` (fp32)."""
        out = {}
        for n, t in g.items():
            e = self.residual.get(n)
            out[n] = t.float() + e if e is not None else t.float().clone()
        return out

    def stage(self, compensated: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
        """Remember e' = u − ĉ for the tensors just sent (replaces any earlier staged residual)."""
        self._pending = {n: compensated[n] - sent[n] for n in compensated}

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    @property
    def pending(self) -> dict[str, torch.Tensor] | None:
        """The staged residual awaiting acknowledgement (saved with the sender's state)."""
        return self._pending

    def set_pending(self, pending: dict[str, torch.Tensor]) -> None:
        """Restore a staged residual (after a restart between sending and the ack)."""
        self._pending = {n: t.clone().float() for n, t in pending.items()}

    def commit(self) -> None:
        """The receiver acknowledged the staged update: its residual becomes current."""
        if self._pending is not None:
            self.residual.update(self._pending)
            self._pending = None

    def discard(self) -> None:
        """The staged update did not count: keep the previous residual."""
        self._pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Committed residuals (what survives a restart)."""
        return {n: t.clone() for n, t in self.residual.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {n: t.clone().float() for n, t in state.items()}
        self._pending = None
