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

import logging
import multiprocessing
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from fedtrain.aggregation.leaf import (
    ACCUMULATE,
    fixed_point_add,
    fixed_point_limit,
    fixed_point_weight,
    serve,
)
from fedtrain.aggregation.mean import Aggregator, StreamingMean, check_weight
from fedtrain.aggregation.shape import Tree, parse_tree

__all__ = [
    "Aggregation",
    "FixedPointMean",
    "TreeError",
    "TreeMean",
    "TreeProcesses",
    "aggregation_from_config",
]

log = logging.getLogger(__name__)

SLOTS = 2
"""Update slots per leaf: the coordinator fills one while the leaf folds the other."""


class TreeError(RuntimeError):
    """An aggregator process failed, exited or did not answer in time."""


class FixedPointMean(Aggregator):
    """Flat weighted mean with exact int64 fixed-point sums: the result has the same bits for
    any arrival order, and a :class:`TreeMean` in int64 mode reproduces it for any tree shape."""

    def __init__(self, fraction_bits: int = 32, max_silos: int = 4096) -> None:
        self.bits = fraction_bits
        self.limit = fixed_point_limit(max_silos)
        self._sum: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        self.total_weight = 0
        """Σ round(w·2^bits), a Python int."""
        self.count = 0

    def add(
        self,
        tensors: dict[str, torch.Tensor],
        weight: float,
        sender: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Add round(w·x·2^bits) to the integer sums."""
        check_weight(weight)
        for n, t in tensors.items():
            x = t.detach().float().reshape(-1)
            first = n not in self._sum
            if first:
                self._sum[n] = torch.empty(x.numel(), dtype=torch.int64)
                self._shapes[n] = t.shape
            fixed_point_add(self._sum[n], x, weight, self.bits, self.limit, first=first)
        self.total_weight += fixed_point_weight(weight, self.bits)
        self.count += 1

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._sum.values())

    def mean(self) -> dict[str, torch.Tensor] | None:
        if self.total_weight <= 0:
            return None
        w = float(self.total_weight)
        return {
            n: (t.to(torch.float64) / w).float().view(self._shapes[n]) for n, t in self._sum.items()
        }


@dataclass(slots=True)
class _Proc:
    process: BaseProcess
    conn: Connection
    free: list[int] = field(default_factory=lambda: list(range(SLOTS)))
    adds: int = 0
    """Updates sent to this leaf in the current round."""


def _shutdown(
    procs: list[_Proc],
    blocks: dict[str, SharedMemory],
    views: dict[str, torch.Tensor],
    timeout_s: float,
) -> None:
    """Stop every process (ask, then terminate, then kill) and free the shared memory."""
    for p in procs:
        try:
            p.conn.send(("stop",))
        except (OSError, ValueError):
            pass  # already gone
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.process.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.process.is_alive():
            p.process.terminate()
            p.process.join(2.0)
        if p.process.is_alive():
            p.process.kill()
            p.process.join()
        p.conn.close()
    procs.clear()
    views.clear()  # views export the blocks' buffers; they must go before the blocks close
    for block in blocks.values():
        try:
            block.close()
        except BufferError:
            pass
        try:
            block.unlink()
        except FileNotFoundError:
            pass
    blocks.clear()


class TreeProcesses:
    """The aggregator processes of one :class:`~fedtrain.aggregation.shape.Tree` and their shared
    memory: a block per leaf slot (fp32 update) and one per node (its partial sum)."""

    def __init__(
        self,
        tree: Tree,
        *,
        accumulate: str = "float",
        fraction_bits: int = 32,
        capacity: int = 0,
        timeout_s: float = 300.0,
    ) -> None:
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {sorted(ACCUMULATE)}, got {accumulate!r}")
        self.tree = tree
        self.accumulate = accumulate
        self.dtype = ACCUMULATE[accumulate]
        self.bits = fraction_bits
        self.limit = fixed_point_limit(tree.n_silos)
        self.timeout_s = timeout_s
        self.capacity = 0
        """Values each block holds (grows when a round needs more)."""
        self._hint = capacity
        self.generation = 0
        """Rounds begun so far; a TreeMean of an older round may not add any more."""
        self._procs: list[_Proc] = []
        self._blocks: dict[str, SharedMemory] = {}
        self._views: dict[str, torch.Tensor] = {}
        self._slots: dict[int, list[str]] = {}
        self._outs: dict[int, str] = {}
        self._root = torch.empty(0, dtype=self.dtype)
        """The root's sum buffer, reused every round."""
        self._finalizer: weakref.finalize | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the running aggregator processes (empty when stopped)."""
        return [p.process.pid for p in self._procs if p.process.pid is not None]

    @property
    def started(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        """Start one process per tree node (no-op when running)."""
        if self._procs:
            return
        # forkserver: children fork from a clean single-threaded server that imported torch
        # once, instead of forking a multi-threaded coordinator or importing torch per child.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "fedtrain.aggregation.leaf"])
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._blocks, self._views, 10.0
        )
        try:
            for node in self.tree.nodes:
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=serve, args=(theirs,), name=f"fedtrain-agg-{node.index}", daemon=True
                )
                proc.start()
                theirs.close()
                self._procs.append(_Proc(process=proc, conn=mine))
        except BaseException:
            self.close()
            raise
        log.info("started %d aggregator processes for tree %s", len(self._procs), self.tree.spec())

    def close(self) -> None:
        """Stop the processes and free the shared memory (idempotent; start() works again)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._slots.clear()
        self._outs.clear()
        self._root = torch.empty(0, dtype=self.dtype)
        self.capacity = 0
        self.generation += 1  # an aggregator of the closed round cannot add any more

    def _send(self, i: int, msg: tuple[Any, ...]) -> None:
        try:
            self._procs[i].conn.send(msg)
        except OSError:
            code = self._procs[i].process.exitcode
            raise self._fail(f"aggregator node {i} exited (exit code {code})") from None

    def _fail(self, text: str) -> TreeError:
        self.close()
        return TreeError(text)

    def _recv(self, i: int) -> tuple[Any, ...]:
        p = self._procs[i]
        try:
            if not p.conn.poll(self.timeout_s):
                raise self._fail(f"aggregator node {i} did not answer within {self.timeout_s}s")
            msg: tuple[Any, ...] = p.conn.recv()
        except (EOFError, OSError):
            code = p.process.exitcode
            raise self._fail(f"aggregator node {i} exited (exit code {code})") from None
        if msg[0] == "error":
            raise self._fail(f"aggregator node {i}: {msg[1]}")
        if msg[0] == "ack":
            p.free.append(msg[1])
        return msg

    def _allocate(self, numel: int) -> None:
        """(Re)create every block for ``numel`` values; nothing may be in flight."""
        old = dict(self._blocks)
        self._views.clear()
        self._blocks.clear()
        self._slots.clear()
        self._outs.clear()
        out_bytes = max(1, numel * self.dtype.itemsize)
        for node in self.tree.nodes:
            if node.is_leaf:
                names = []
                for _ in range(SLOTS):
                    block = SharedMemory(create=True, size=max(1, numel * 4))
                    self._blocks[block.name] = block
                    names.append(block.name)
                self._slots[node.index] = names
            block = SharedMemory(create=True, size=out_bytes)
            self._blocks[block.name] = block
            self._outs[node.index] = block.name
        # Touch every page now (once per run): first writes to fresh pages cost several times
        # a copy, and would otherwise land in the first rounds.
        for block in self._blocks.values():
            assert block.buf is not None, "a new block is mapped"
            np.frombuffer(block.buf, dtype=np.uint8).fill(0)
        self._root = torch.zeros(numel, dtype=self.dtype)
        # The nodes drop their old mappings at the next 'begin'; the names can go now.
        for block in old.values():
            try:
                block.close()
            except BufferError:  # a stale view; the mapping goes with it
                pass
            block.unlink()
        self.capacity = numel

    def _view(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if name not in self._views:
            self._views[name] = torch.frombuffer(
                self._blocks[name].buf, dtype=dtype, count=self.capacity
            )
        return self._views[name][:numel]

    def begin(self, numel: int) -> int:
        """Start a round of ``numel`` values per update; returns its generation."""
        self.start()
        for i, p in enumerate(self._procs):
            while len(p.free) < SLOTS:  # acks of an abandoned round
                self._recv(i)
            p.adds = 0
        if numel > self.capacity or not self._outs:
            self._allocate(max(numel, self.capacity, self._hint))
        self.generation += 1
        for node in self.tree.nodes:
            self._send(
                node.index,
                (
                    "begin",
                    numel,
                    self.accumulate,
                    self.bits,
                    self.limit,
                    self._slots.get(node.index, []),
                    self._outs[node.index],
                    [self._outs[c] for c in node.children],
                ),
            )
        return self.generation

    def submit(
        self, generation: int, leaf: int, tensors: list[torch.Tensor], weight: float
    ) -> None:
        """Copy one update into a free slot of ``leaf`` and have the leaf fold it in."""
        if generation != self.generation:
            raise RuntimeError("this round's aggregator is stale (a later round has begun)")
        p = self._procs[leaf]
        while not p.free:
            self._recv(leaf)
        slot = p.free.pop(0)
        numel = sum(t.numel() for t in tensors)
        # A single-threaded memcpy (numpy): torch's multi-threaded copy_ would contend for the
        # cores the leaves are folding on, and on a busy machine mostly wait for them.
        dst = self._view(self._slots[leaf][slot], torch.float32, numel).numpy()
        off = 0
        for t in tensors:
            n = t.numel()
            np.copyto(dst[off : off + n], t.detach().reshape(-1).float().numpy())
            off += n
        self._send(leaf, ("add", slot, weight))
        p.adds += 1

    def collect(self, generation: int) -> list[tuple[int, float | int, int]]:
        """Flush the leaves, let inner nodes add their children level by level (deepest
        first); return the root's children's ``(node, Σ w, count)`` in the tree's order."""
        if generation != self.generation:
            raise RuntimeError("this round's aggregator is stale (a later round has begun)")
        done: dict[int, tuple[float | int, int]] = {}
        leaves = [n.index for n in self.tree.leaves if self._procs[n.index].adds]
        for i in leaves:
            self._send(i, ("flush",))
        for i in leaves:
            while (msg := self._recv(i))[0] != "done":
                pass
            done[i] = (msg[1], msg[2])
        for level in self.tree.inner_levels():
            asked = []
            for node in level:
                parts = [(pos, *done[c]) for pos, c in enumerate(node.children) if c in done]
                if parts:
                    self._send(node.index, ("combine", parts))
                    asked.append(node.index)
            for i in asked:
                msg = self._recv(i)
                done[i] = (msg[1], msg[2])
        return [(c, *done[c]) for c in self.tree.root_children if c in done]

    def root_sum(self, numel: int) -> torch.Tensor:
        """The root's sum buffer for ``numel`` values (reused across rounds)."""
        return self._root[:numel]

    def partial_sum(self, node: int, numel: int) -> torch.Tensor:
        """A node's partial sum (a view of its shared block; valid until the next round)."""
        return self._view(self._outs[node], self.dtype, numel)

    def node_bytes(self, numel: int) -> dict[int, int]:
        """Bytes each node holds for a round of ``numel`` values (slots and partial sum)."""
        out = numel * self.dtype.itemsize
        return {n.index: out + (SLOTS * 4 * numel if n.is_leaf else 0) for n in self.tree.nodes}


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
        tensors: dict[str, torch.Tensor],
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
