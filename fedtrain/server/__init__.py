"""Coordinator: the engine-independent round loop, close conditions, validation,
and the Flower deployment (ServerApp, SuperLink launcher, fleet-only proxy).

Names are imported lazily: torch-free parts (process helpers used by the mailbox ClientApp)
must not pull in torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

__all__ = [
    "AllReplied",
    "CloseCondition",
    "Coordinator",
    "Engine",
    "Quorum",
    "Reply",
    "RoundLedger",
    "RoundResult",
    "RunTotals",
    "UpdateRejected",
    "close_condition",
    "triage",
    "validate_update",
]

_WHERE = {
    "AllReplied": "fedtrain.server.closing",
    "CloseCondition": "fedtrain.server.closing",
    "Quorum": "fedtrain.server.closing",
    "close_condition": "fedtrain.server.closing",
    "Coordinator": "fedtrain.server.coordinator",
    "RoundLedger": "fedtrain.server.round",
    "RoundResult": "fedtrain.server.round",
    "triage": "fedtrain.server.round",
    "RunTotals": "fedtrain.server.totals",
    "Engine": "fedtrain.server.engine",
    "Reply": "fedtrain.server.engine",
    "UpdateRejected": "fedtrain.server.validate",
    "validate_update": "fedtrain.server.validate",
}


__getattr__ = lazy(__name__, _WHERE)
