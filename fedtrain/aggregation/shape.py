"""Shapes of hierarchical aggregation trees (``round.tree``); pure Python, no torch.

A tree is written as 0 (flat: the coordinator folds every reply itself), a fan-out k >= 2 (a
balanced tree in which no node has more than k children) or a nested list: an integer is a leaf
aggregator that takes that many silos, a list is an inner node over its items, and the outermost
list holds the root's children. ``[[2, 2], [3, 1]]`` is a root over two inner nodes, each over
two leaves. Silos go to leaves in silo order (the first leaf takes the first silos), so one leaf
serves a group of neighbouring silos, e.g. one host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_NODES", "MAX_DEPTH", "Tree", "TreeNode", "fanout_spec", "parse_tree"]

MAX_NODES = 64
"""Most aggregator processes (leaves and inner nodes) one tree may start."""
MAX_DEPTH = 8
"""Deepest nesting of a tree spec."""


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One aggregator process: a leaf (``silos``) or an inner node (``children``)."""

    index: int
    """Position in :attr:`Tree.nodes` (pre-order)."""
    depth: int
    """1 for the root's children, 2 for theirs, ..."""
    children: tuple[int, ...] = ()
    """Indices of the child nodes, in the fixed order they are combined (inner nodes)."""
    silos: tuple[int, ...] = ()
    """Silo positions (in silo order) this leaf accumulates (leaves)."""

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass(frozen=True, slots=True)
class Tree:
    """A parsed tree: every node but the root (which is the coordinator itself)."""

    nodes: tuple[TreeNode, ...]
    root_children: tuple[int, ...]
    """Node indices the root combines, in order."""
    n_silos: int

    @property
    def leaves(self) -> list[TreeNode]:
        return [n for n in self.nodes if n.is_leaf]

    def leaf_of(self) -> dict[int, int]:
        """Silo position -> index of the leaf that accumulates it."""
        return {s: n.index for n in self.leaves for s in n.silos}

    def inner_levels(self) -> list[list[TreeNode]]:
        """Inner nodes grouped by depth, deepest first (the order partial sums move up)."""
        inner = [n for n in self.nodes if not n.is_leaf]
        depths = sorted({n.depth for n in inner}, reverse=True)
        return [[n for n in inner if n.depth == d] for d in depths]

    def spec(self) -> list[Any]:
        """The nested-list spelling of this tree."""

        def one(i: int) -> Any:
            node = self.nodes[i]
            return len(node.silos) if node.is_leaf else [one(c) for c in node.children]

        return [one(i) for i in self.root_children]


def _split(n: int, parts: int) -> list[int]:
    """``n`` items in ``parts`` groups as even as possible, larger groups first."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def fanout_spec(n_silos: int, fanout: int) -> list[Any]:
    """Nested-list spec of the balanced tree with at most ``fanout`` children per node."""
    if fanout < 2:
        raise ValueError("a fan-out >= 2")
    level: list[Any] = _split(n_silos, -(-n_silos // fanout))
    while len(level) > fanout:
        start, grouped = 0, []
        for size in _split(len(level), -(-len(level) // fanout)):
            grouped.append(level[start : start + size])
            start += size
        level = grouped
    return level


def parse_tree(spec: int | list[Any], n_silos: int) -> Tree | None:
    """The tree ``spec`` describes over ``n_silos`` silos, or None for flat aggregation.

    Raises ValueError whose message says what is allowed (the config error names the key).
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, list)):
        raise ValueError("0 (flat), a fan-out >= 2 or a nested list of leaf sizes")
    if isinstance(spec, int):
        if spec == 0:
            return None
        if spec < 2:
            raise ValueError("0 (flat), a fan-out >= 2 or a nested list of leaf sizes")
        spec = fanout_spec(n_silos, spec)
    if not spec:
        return None
    nodes: list[TreeNode] = []
    next_silo = 0

    def build(item: Any, depth: int) -> int:
        nonlocal next_silo
        if depth > MAX_DEPTH:
            raise ValueError(f"a tree at most {MAX_DEPTH} levels deep")
        index = len(nodes)
        if isinstance(item, bool) or not isinstance(item, (int, list)):
            raise ValueError(f"leaf sizes (integers >= 1) and lists of them, not {item!r}")
        if isinstance(item, int):
            if item < 1:
                raise ValueError(f"leaf sizes >= 1 (a leaf of {item} silos aggregates nothing)")
            nodes.append(TreeNode(index, depth, silos=tuple(range(next_silo, next_silo + item))))
            next_silo += item
            return index
        if not item:
            raise ValueError("non-empty lists (an inner node needs children)")
        nodes.append(TreeNode(index, depth))  # placeholder keeps pre-order numbering
        children = tuple(build(child, depth + 1) for child in item)
        nodes[index] = TreeNode(index, depth, children=children)
        return index

    root_children = tuple(build(item, 1) for item in spec)
    if next_silo != n_silos:
        raise ValueError(
            f"leaf sizes adding up to data.silos = {n_silos} (they add up to {next_silo})"
        )
    if len(nodes) > MAX_NODES:
        raise ValueError(
            f"at most {MAX_NODES} aggregator processes (this tree has {len(nodes)}); "
            "use a larger fan-out or bigger leaves"
        )
    return Tree(nodes=tuple(nodes), root_children=root_children, n_silos=n_silos)
