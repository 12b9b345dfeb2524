"""Hierarchical aggregation (LIFL: Qi et al., "LIFL: A Lightweight, Event-driven Serverless
Platform for Federated Learning", MLSys 2024).

Leaf aggregators — separate processes, one per group of silos — accumulate their silos' updates
into partial sums (Σ w·Δ, Σ w); inner nodes add their children's partial sums; the root (the
coordinator) adds its children's and divides. The root then folds one partial sum per child
instead of one update per silo. Partial sums are combined in the tree's fixed order, so the
result does not depend on which leaf finished first; with int64 (fixed-point) accumulation
every addition is exact and any tree shape, and any arrival order, gives the same bits as the
flat integer sum (:class:`FixedPointMean`).

The processes start once per run (on the first round) and stop in :meth:`Aggregation.close`,
on garbage collection or at interpreter exit; they also exit when the coordinator's pipe closes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fedtrain.aggregation.fixed import FixedPointMean
from fedtrain.aggregation.leaf import ACCUMULATE
from fedtrain.aggregation.mean import Aggregator, StreamingMean, check_weight
from fedtrain.aggregation.processes import TreeProcesses
from fedtrain.aggregation.shape import Tree, parse_tree

__all__ = [
    "Aggregation",
    "TreeMean",
    "aggregation_from_config",
]


class TreeMean(Aggregator):
    """One round's weighted mean over a :class:`TreeProcesses` tree."""

    def __init__(self, procs: TreeProcesses, leaf_of: dict[str, int]) -> None:
        self._procs = procs
        self._leaf_of = leaf_of
        self._layout: list[tuple[str, torch.Size, int]] = []
        self._numel = 0
        self._generation = -1
        self._result: dict[str, torch.Tensor] | None = None
        self._closed = False
        self.count = 0
        self.root_ingress_bytes = 0
        """Bytes of partial sums the root read to form the result."""
        self.combine_s = 0.0
        """Seconds from the close of the round to the result (flush, inner nodes, root)."""

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Hand ``tensors`` to the leaf of ``sender``; it accumulates w·x there."""
        check_weight(weight)
        if self._closed:
            raise RuntimeError("add after mean(): the round is closed")
        if sender not in self._leaf_of:
            raise ValueError(f"silo {sender!r} has no leaf in the aggregation tree")
        if not self._layout:
            self._layout = [(n, t.shape, t.numel()) for n, t in tensors.items()]
            self._numel = sum(n for _, _, n in self._layout)
            self._generation = self._procs.begin(self._numel)
        elif set(tensors) != {n for n, _, _ in self._layout} or any(
            tensors[n].shape != s for n, s, _ in self._layout
        ):
            raise ValueError(f"update from {sender!r} does not match the round's tensors")
        ordered = [tensors[n] for n, _, _ in self._layout]
        self._procs.submit(self._generation, self._leaf_of[sender], ordered, weight)
        self.count += 1

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the root's own sum buffer (the leaves' are in :meth:`report`)."""
        return self._numel * self._procs.dtype.itemsize

    def mean(self) -> dict[str, torch.Tensor] | None:
        """Σ w·x / Σ w from the root's children's partial sums, added in the tree's order."""
        if self._closed:
            return self._result
        self._closed = True
        if not self.count:
            return None
        t0 = time.perf_counter()
        parts = self._procs.collect(self._generation)
        total: float | int = 0
        acc = self._procs.root_sum(self._numel)
        for i, (node, weight, _) in enumerate(parts):
            child = self._procs.partial_sum(node, self._numel)
            if i:
                acc.add_(child)
            else:
                acc.copy_(child)
            total += weight
            self.root_ingress_bytes += child.numel() * child.element_size()
        if total > 0:
            self._result = self._divide(acc, total)
        self.combine_s = time.perf_counter() - t0
        return self._result

    def _divide(self, acc: torch.Tensor, total: float | int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        off = 0
        for name, shape, n in self._layout:
            part = acc[off : off + n]
            if acc.dtype == torch.int64:
                out[name] = (part.to(torch.float64) / float(total)).float().view(shape)
            else:
                out[name] = (part / total).view(shape)  # as StreamingMean.mean
            off += n
        return out

    def report(self) -> dict[str, Any]:
        """Tree facts for the round's record: shape, the leaves' bytes, what the root read."""
        if not self._closed:
            return {}
        tree = self._procs.tree
        held = self._procs.node_bytes(self._numel)
        return {
            "tree": tree.spec(),
            "tree_accumulate": self._procs.accumulate,
            "tree_leaf_bytes": [held[n.index] for n in tree.leaves],
            "tree_inner_bytes": sum(held[n.index] for n in tree.nodes if not n.is_leaf),
            "tree_root_ingress_bytes": self.root_ingress_bytes,
            "tree_flat_ingress_bytes": self.count * self._numel * 4,
            "tree_combine_s": round(self.combine_s, 6),
        }


class Aggregation:
    """How a DiLoCo-family strategy combines replies: flat or over a tree, fp32 or int64.

    Owns the tree's processes (started on the first round, kept for the run); call
    :meth:`close` when the run ends.
    """

    def __init__(
        self,
        tree: Tree | None,
        silos: list[str],
        *,
        accumulate: str = "float",
        fraction_bits: int = 32,
        numel: int = 0,
        timeout_s: float = 300.0,
    ) -> None:
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {sorted(ACCUMULATE)}, got {accumulate!r}")
        if tree is not None and tree.n_silos != len(silos):
            raise ValueError(f"the tree spans {tree.n_silos} silos but the run has {len(silos)}")
        self.tree = tree
        self.silos = list(silos)
        self.accumulate = accumulate
        self.fraction_bits = fraction_bits
        self.processes: TreeProcesses | None = None
        if tree is not None:
            self.processes = TreeProcesses(
                tree,
                accumulate=accumulate,
                fraction_bits=fraction_bits,
                capacity=numel,
                timeout_s=timeout_s,
            )
            self._leaf_of = {self.silos[s]: leaf for s, leaf in tree.leaf_of().items()}

    def new_aggregator(self) -> Aggregator:
        """This round's aggregator (the tree's processes start on the first call)."""
        if self.processes is not None:
            self.processes.start()
            return TreeMean(self.processes, self._leaf_of)
        if self.accumulate == "int64":
            return FixedPointMean(self.fraction_bits, max_silos=len(self.silos))
        return StreamingMean()

    def close(self) -> None:
        """Stop the tree's processes (idempotent)."""
        if self.processes is not None:
            self.processes.close()


def aggregation_from_config(cfg: Any, numel: int = 0) -> Aggregation | None:
    """The configured :class:`Aggregation`, or None for the default flat fp32 mean."""
    r = cfg.round
    tree = parse_tree(r.tree, cfg.data.silos)
    if tree is None and r.accumulate == "float":
        return None
    return Aggregation(
        tree,
        cfg.silo_names(),
        accumulate=r.accumulate,
        fraction_bits=r.fraction_bits,
        numel=numel,
    )
