"""Coordinator: the engine-independent round loop, aggregation, close conditions, validation."""

from fedtrain.server.aggregate import StreamingMean
from fedtrain.server.closing import AllReplied, CloseCondition, Quorum, close_condition
from fedtrain.server.coordinator import Coordinator, RunTotals
from fedtrain.server.engine import Engine, Reply
from fedtrain.server.validate import UpdateRejected, validate_update

__all__ = [
    "AllReplied",
    "CloseCondition",
    "Coordinator",
    "Engine",
    "Quorum",
    "Reply",
    "RunTotals",
    "StreamingMean",
    "UpdateRejected",
    "close_condition",
    "validate_update",
]
