"""The coordinator's error-feedback residual, kept in the run store instead of in memory.

The broadcast's residual e (one fp32 model's worth) is needed only inside the outer step. It
lives as one run-store blob per tensor: the outer step reads e_n, forms u_n = δ_n + e_n, encodes
it, and writes the new e_n = u_n − û_n back straight away, so the coordinator never holds a
whole residual (it would be a fourth model-sized buffer next to the weights, the outer momentum
and the running sum). The committed state names the blobs (``feedback_blobs``); retention
keeps them like any other blob a kept round references. Arithmetic is that of
:class:`~fedtrain.transport.feedback.ErrorFeedback` (u = δ + e, e' = u − û), bit for bit:
safetensors round-trips fp32 exactly.
"""

from __future__ import annotations

import torch

from fedtrain.storage.runstore import RunStore

__all__ = ["StoredResidual"]


class StoredResidual:
    """Per-tensor residual blobs of the coordinator's broadcast (absent: zero)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.ids: dict[str, str] = {}
        """Tensor name -> blob holding its current residual."""

    def compensate(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """u = δ + e for one tensor (fp32)."""
        blob = self.ids.get(name)
        if blob is None:
            return delta.float().clone()
        return delta.float() + self.store.get_tensors(blob)[0][name]

    def replace(self, name: str, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """e ← u − û, written out at once (the coordinator's broadcast always counts)."""
        self.ids[name] = self.store.put_tensors({name: compensated - sent})

    def state(self) -> dict[str, str]:
        """What the commit records."""
        return dict(self.ids)

    def restore(self, ids: dict[str, str]) -> None:
        self.ids = dict(ids)

    def restore_tensors(self, residual: dict[str, torch.Tensor]) -> None:
        """From a run committed with the whole residual in one blob (``feedback_blob``)."""
        self.ids = {n: self.store.put_tensors({n: t.float()}) for n, t in residual.items()}
