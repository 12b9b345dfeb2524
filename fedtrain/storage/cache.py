"""A byte-budgeted cache of recent rounds, next to which non-training workloads run.

After FLStore (Khan et al., MLSys 2025): workloads that are not training — similarity of silos
to the aggregate, anomaly detection, contribution scores, round debugging, serving the latest
model — read the same few objects again and again. Policies by access pattern:
- per-round workloads: the latest ``keep_rounds`` rounds of decoded silo updates and aggregates
  stay resident; round r is PREFETCHED when it is committed (:meth:`on_commit`);
- per-silo cross-round workloads: derived scalars (norm, cosine to the aggregate, loss, tokens)
  are kept for every round — a few numbers each, never evicted;
- the latest aggregate and global weights are pinned;
- everything else is LRU under ``budget_bytes``. Everything evicted is still in the store.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtrain.storage.runstore import RunStore
from fedtrain.transport.payload import LazyTensors, decode_payload

__all__ = ["CacheStats", "MetadataCache", "flatten"]

log = logging.getLogger(__name__)

Key = tuple[str, int, str]  # (kind, round, silo or "")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetched: int = 0
    peak_bytes: int = 0
    scalars: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


_CHUNK = 1 << 20


def _dot_and_squares(u: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """⟨u, a⟩ and ‖u‖², accumulated in float64 a chunk at a time (no float64 copy of a whole
    tensor: an embedding of a 1B model would be 0.5 GB per copy)."""
    u, a = u.reshape(-1), a.reshape(-1)
    dot = squares = 0.0
    for i in range(0, u.numel(), _CHUNK):
        uc = u[i : i + _CHUNK].double()
        dot += float(torch.dot(uc, a[i : i + _CHUNK].double()))
        squares += float(uc.square().sum())
    return dot, squares


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    """ℓ2 norm over every tensor, accumulated in float64 (no flattened copy)."""
    total = 0.0
    for t in tensors.values():
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            total += float(flat[i : i + _CHUNK].double().square().sum())
    return total**0.5


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).float() for n in sorted(tensors)])


class MetadataCache:
    """Recent rounds of one run, in memory, under a byte budget."""

    def __init__(self, store: RunStore, budget_bytes: int, keep_rounds: int = 2) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be > 0 bytes, got {budget_bytes}")
        self.store = store
        self.budget = budget_bytes
        self.keep_rounds = keep_rounds
        self._lru: OrderedDict[Key, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes: dict[Key, int] = {}
        self.pinned: set[Key] = set()
        self.stats = CacheStats()

    # ------------------------------------------------------------ accounting
    @property
    def resident_bytes(self) -> int:
        return sum(self._bytes.values())

    def _insert(self, key: Key, value: dict[str, torch.Tensor], pin: bool = False) -> None:
        size = _nbytes(value)
        if key in self._lru:
            self._drop(key)
        if size > self.budget:  # cannot fit: not kept (reads fall back to the store)
            return
        if pin:
            self.pinned.add(key)
        self._lru[key] = value
        self._bytes[key] = size
        self._evict()
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.resident_bytes)

    def _drop(self, key: Key) -> None:
        self._lru.pop(key, None)
        self._bytes.pop(key, None)

    def _evict(self) -> None:
        """LRU among unpinned entries until within budget (pinned ones count but stay)."""
        for key in list(self._lru):
            if self.resident_bytes <= self.budget:
                return
            if key in self.pinned:
                continue
            self._drop(key)
            self.stats.evictions += 1
        if self.resident_bytes > self.budget:
            # Only pinned data left and still too big: unpin the oldest pins.
            for key in list(self._lru):
                if self.resident_bytes <= self.budget:
                    return
                self.pinned.discard(key)
                self._drop(key)
                self.stats.evictions += 1

    def _get(self, key: Key, load: Any) -> dict[str, torch.Tensor]:
        if key in self._lru:
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return self._lru[key]
        self.stats.misses += 1
        value = load()
        self._insert(key, value)
        return value

    # ----------------------------------------------------------------- reads
    def update(self, rnd: int, silo: str) -> dict[str, torch.Tensor]:
        """Silo's decoded update for round ``rnd`` (cache or store)."""

        def load() -> dict[str, torch.Tensor]:
            rows = self.store.index.updates(rnd, silo)
            if not rows or not rows[0]["blob"]:
                raise KeyError(
                    f"no stored update from {silo} in round {rnd} (updates are kept for the "
                    "last storage.keep_updates rounds)"
                )
            return dict(decode_payload(self.store.blobs.get(rows[0]["blob"])).tensors)

        return self._get(("update", rnd, silo), load)

    def _state_tensors(self, kind: str, rnd: int) -> dict[str, torch.Tensor]:
        def load() -> dict[str, torch.Tensor]:
            return self.store.get_tensors(self.store.index.round_state(rnd)[f"{kind}_blob"])[0]

        return self._get((kind, rnd, ""), load)

    def aggregate(self, rnd: int) -> dict[str, torch.Tensor]:
        """The weighted mean update the coordinator applied in round ``rnd``."""
        return self._state_tensors("aggregate", rnd)

    def global_weights(self, rnd: int) -> dict[str, torch.Tensor]:
        """Global weights committed at round ``rnd`` (round 0: the initial weights)."""
        if rnd == 0:
            blob = self.store.index.get_meta("initial_global_blob")
            return self._get(("global", 0, ""), lambda: self.store.get_tensors(blob)[0])
        return self._state_tensors("global", rnd)

    def valid_silos(self, rnd: int) -> list[str]:
        return [u["silo"] for u in self.store.index.updates(rnd) if u["valid"]]

    def weights_of(self, rnd: int) -> dict[str, float]:
        return {
            u["silo"]: float(u["weight"] or 0.0)
            for u in self.store.index.updates(rnd)
            if u["valid"]
        }

    # -------------------------------------------------------------- policies
    def on_commit(self, rnd: int, aggregate: dict[str, torch.Tensor] | None = None) -> None:
        """Prefetch round ``rnd`` (updates, aggregate, weights), pin the newest, drop old rounds,
        and record the derived per-silo scalars for cross-round workloads.

        ``aggregate`` is the round's mean update as the coordinator holds it (else it is read
        back). What does not fit is not built: an update is decoded a
        tensor at a time for its scalars and dropped, so a model larger than the budget costs
        one stored payload and one tensor here, never a model-sized copy.
        """
        for key in [k for k in self.pinned if k[1] < rnd]:
            self.pinned.discard(key)
        for key in [k for k in self._lru if k[1] <= rnd - self.keep_rounds]:
            self._drop(key)
        state = self.store.index.round_state(rnd)
        # Read back only when the caller does not have it (the coordinator always does).
        agg = (
            aggregate
            if aggregate is not None
            else self.store.get_tensors(state["aggregate_blob"])[0]
        )
        self._insert(("aggregate", rnd, ""), agg, pin=True)
        if self.store.blobs.size(state["global_blob"]) <= self.budget:  # else not built
            weights = self.store.get_tensors(state["global_blob"])[0]
            self._insert(("global", rnd, ""), weights, pin=True)
            del weights
        agg_norm = _norm(agg)
        for row in self.store.index.updates(rnd):
            if not row["valid"] or not row["blob"]:
                continue
            upd = decode_payload(self.store.blobs.get(row["blob"]), lazy=True).tensors
            assert isinstance(upd, LazyTensors)
            if 4 * upd.total_numel <= self.budget:
                self._insert(("update", rnd, row["silo"]), dict(upd.items()))
                self.stats.prefetched += 1
            if {n: upd.shape_of(n) for n in upd} != {n: tuple(t.shape) for n, t in agg.items()}:
                continue  # not a model-shaped update (e.g. zeroth-order codes)
            dot = squares = 0.0
            for n in agg:  # tensor by tensor, each decoded once
                d, sq = _dot_and_squares(upd[n], agg[n])
                dot, squares = dot + d, squares + sq
            norm = squares**0.5
            cos = dot / max(norm * agg_norm, 1e-8)
            del upd
            self.stats.scalars[(rnd, row["silo"])] = {
                "norm": norm,
                "cosine_to_aggregate": cos,
                "weight": float(row["weight"] or 0.0),
                "bytes": float(row["bytes"]),
            }
