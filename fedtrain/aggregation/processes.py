"""The aggregator processes of a hierarchical tree and their shared memory (LIFL: Qi et al.,
"LIFL: A Lightweight, Event-driven Serverless Platform for Federated Learning", MLSys 2024).

One process per tree node (:func:`fedtrain.aggregation.leaf.serve`), started from a forkserver
once per run; updates and partial sums travel in shared-memory blocks, the pipes carry only small
commands. The processes stop in :meth:`TreeProcesses.close`, on garbage collection or at
interpreter exit; they also exit when the coordinator's pipe closes.
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

from fedtrain.aggregation.fixed import fixed_point_limit
from fedtrain.aggregation.leaf import ACCUMULATE, serve
from fedtrain.aggregation.shape import Tree

__all__ = ["SLOTS", "TreeError", "TreeProcesses"]

log = logging.getLogger(__name__)

SLOTS = 2
"""Update slots per leaf: the coordinator fills one while the leaf folds the other."""


class TreeError(RuntimeError):
    """An aggregator process failed, exited or did not answer in time."""


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
