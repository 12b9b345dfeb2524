"""One aggregator process of a hierarchical tree (LIFL, Qi et al. 2024).

A leaf accumulates its silos' updates into a partial sum (Σ w·Δ, Σ w); an inner node adds its
children's partial sums in a fixed order. Tensors never travel through the pipe: updates arrive
in shared-memory slots the coordinator writes, partial sums are left in the node's own
shared-memory block for its parent to read. The pipe carries only small commands and replies.

Integer (int64) rounds use the fixed-point helpers of :mod:`fedtrain.aggregation.fixed`, so the
coordinator's flat integer sum and every leaf round values exactly the same way.
"""

from __future__ import annotations

import signal
import traceback
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

from fedtrain.aggregation.fixed import fixed_point_add, fixed_point_weight

__all__ = ["ACCUMULATE", "serve"]

ACCUMULATE = {"float": torch.float32, "int64": torch.int64}
"""Accumulator dtype of each ``round.tree_accumulate`` mode."""


def _close(block: SharedMemory) -> None:
    try:
        block.close()
    except BufferError:  # a view is still alive; the mapping ends with it (or the process)
        pass


class _Node:
    """State of one aggregator process across rounds."""

    def __init__(self) -> None:
        self.blocks: dict[str, SharedMemory] = {}
        self.slots: list[torch.Tensor] = []
        self.children: list[torch.Tensor] = []
        self.acc: torch.Tensor | None = None
        self.mode = "float"
        self.bits = 0
        self.limit = 0.0
        self.weight: float | int = 0
        self.count = 0

    def _view(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if name not in self.blocks:
            self.blocks[name] = SharedMemory(name=name)
        return torch.frombuffer(self.blocks[name].buf, dtype=dtype, count=numel)

    def begin(
        self,
        numel: int,
        mode: str,
        bits: int,
        limit: float,
        slots: list[str],
        out: str,
        children: list[str],
    ) -> None:
        """Start a round: attach this round's blocks, forget the last round's sum."""
        self.slots, self.children, self.acc = [], [], None
        keep = {*slots, out, *children}
        for name in [n for n in self.blocks if n not in keep]:
            _close(self.blocks.pop(name))  # the coordinator replaced (and unlinked) it
        dtype = ACCUMULATE[mode]
        self.mode, self.bits, self.limit = mode, bits, limit
        self.slots = [self._view(n, torch.float32, numel) for n in slots]
        self.children = [self._view(n, dtype, numel) for n in children]
        self.acc = self._view(out, dtype, numel)
        self.weight = 0 if mode == "int64" else 0.0
        self.count = 0

    def add(self, slot: int, weight: float) -> None:
        """Fold the update in ``slot`` with ``weight`` into the partial sum."""
        assert self.acc is not None, "add before begin"
        x = self.slots[slot]
        if self.mode == "int64":
            fixed_point_add(self.acc, x, weight, self.bits, self.limit, first=not self.count)
            self.weight += fixed_point_weight(weight, self.bits)
        else:
            # Same operations as the flat StreamingMean: a one-leaf tree gives its bits.
            if self.count:
                self.acc.add_(x, alpha=weight)
            else:
                torch.mul(x, weight, out=self.acc)
            self.weight += weight
        self.count += 1

    def combine(self, parts: list[tuple[int, float | int, int]]) -> None:
        """Add the children's partial sums ``(child position, Σ w, count)`` in the given order."""
        assert self.acc is not None, "combine before begin"
        self.weight = 0 if self.mode == "int64" else 0.0
        self.count = 0
        for i, (pos, weight, count) in enumerate(parts):
            if i:
                self.acc.add_(self.children[pos])
            else:
                self.acc.copy_(self.children[pos])
            self.weight += weight
            self.count += count

    def close(self) -> None:
        self.slots, self.children, self.acc = [], [], None
        for block in self.blocks.values():
            _close(block)
        self.blocks.clear()


def serve(conn: Connection) -> None:
    """Process main: answer the coordinator's commands until 'stop' or until its pipe closes.

    Commands: ('begin', numel, mode, bits, limit, slots, out, children) -> no reply;
    ('add', slot, w) -> ('ack', slot); ('flush',) and ('combine', parts) -> ('done', Σ w, count);
    ('stop',) -> exit. A failure answers ('error', text) and the node waits for the next round.
    """
    # Ctrl-C reaches the whole process group; the coordinator decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    node = _Node()
    try:
        while True:
            msg: tuple[Any, ...] = conn.recv()
            op = msg[0]
            if op == "stop":
                break
            try:
                if op == "begin":
                    node.begin(*msg[1:])
                elif op == "add":
                    node.add(msg[1], msg[2])
                    conn.send(("ack", msg[1]))
                elif op == "flush":
                    conn.send(("done", node.weight, node.count))
                elif op == "combine":
                    node.combine(msg[1])
                    conn.send(("done", node.weight, node.count))
                else:
                    raise ValueError(f"unknown command {op!r}")
            except Exception as e:  # reported to the coordinator, which raises it there
                conn.send(("error", "".join(traceback.format_exception_only(type(e), e)).strip()))
    except (EOFError, OSError):
        pass  # the coordinator is gone: nothing left to serve
    finally:
        node.close()
        conn.close()
