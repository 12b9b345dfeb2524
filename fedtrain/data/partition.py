"""Split documents into a held-out eval set and disjoint per-silo training shards."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedtrain.data.corpus import Document

__all__ = ["Partition", "partition_documents"]


@dataclass(frozen=True, slots=True)
class Partition:
    eval_docs: list[Document]
    """Held-out documents (never trained on), spread over the whole corpus."""
    silo_docs: list[list[Document]]
    """Training documents of each silo; disjoint, together exactly the training split."""


def _balanced_contiguous(docs: list[Document], k: int) -> list[list[Document]]:
    """Cut ``docs`` (in order) into ``k`` contiguous runs of near-equal character count."""
    total = max(sum(len(d.text) for d in docs), 1)
    n = len(docs)
    shards: list[list[Document]] = [[] for _ in range(k)]
    acc, prev = 0, -1
    for i, d in enumerate(docs):
        target = int((acc + len(d.text) / 2) * k / total)
        # Monotone, no shard skipped, and enough documents left to fill the later shards.
        lo, hi = max(prev, k - n + i), min(prev + 1, k - 1)
        prev = min(max(target, lo), hi)
        shards[prev].append(d)
        acc += len(d.text)
    return shards


def partition_documents(
    docs: list[Document], silos: int, split: str, eval_fraction: float, seed: int
) -> Partition:
    """Hold out every ``1/eval_fraction``-th document for eval; split the rest among silos.

    ``split='noniid'`` keeps canonical order and cuts contiguous runs (e.g. different books of
    the Bible per silo); ``'iid'`` shuffles documents with ``seed`` before cutting.
    """
    if split not in ("iid", "noniid"):
        raise ValueError(f"split must be 'iid' or 'noniid', got {split!r}")
    stride = max(2, round(1 / eval_fraction))
    eval_docs = [d for i, d in enumerate(docs) if i % stride == stride // 2]
    train = [d for i, d in enumerate(docs) if i % stride != stride // 2]
    if len(train) < silos:
        raise ValueError(
            f"{len(train)} training documents cannot be split among {silos} silos; "
            "use fewer silos or more text"
        )
    if split == "iid":
        train = list(train)
        random.Random(seed).shuffle(train)
    return Partition(eval_docs=eval_docs, silo_docs=_balanced_contiguous(train, silos))
