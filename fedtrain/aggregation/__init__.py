"""How a round's replies are combined: the streaming weighted mean, int64 fixed-point sums,
robust aggregators (median, trimmed and clipped mean) and aggregation trees.

Strategies and the coordinator import this package; it imports neither.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

__all__ = [
    "Aggregation",
    "Aggregator",
    "FixedPointMean",
    "RobustAggregation",
    "StreamingMean",
    "Tree",
    "TreeError",
    "TreeMean",
    "aggregation_from_config",
    "parse_tree",
]

_WHERE = {
    "Aggregator": "fedtrain.aggregation.mean",
    "StreamingMean": "fedtrain.aggregation.mean",
    "RobustAggregation": "fedtrain.aggregation.robust",
    "Tree": "fedtrain.aggregation.shape",
    "parse_tree": "fedtrain.aggregation.shape",
    "Aggregation": "fedtrain.aggregation.tree",
    "FixedPointMean": "fedtrain.aggregation.fixed",
    "TreeError": "fedtrain.aggregation.processes",
    "TreeMean": "fedtrain.aggregation.tree",
    "aggregation_from_config": "fedtrain.aggregation.tree",
}

__getattr__ = lazy(__name__, _WHERE)
