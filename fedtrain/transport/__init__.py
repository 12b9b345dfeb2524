"""Codecs, error feedback, framed (optionally signed) payloads, and their Flower records.

Names are imported lazily so that :mod:`fedtrain.transport.records` (used by the mailbox
ClientApp, which starts once per message) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "CODECS",
    "Codec",
    "Payload",
    "PayloadError",
    "decode_payload",
    "encode_payload",
    "get_codec",
]

_WHERE = {
    "CODECS": "fedtrain.transport.codecs",
    "Codec": "fedtrain.transport.codecs",
    "get_codec": "fedtrain.transport.codecs",
    "Payload": "fedtrain.transport.payload",
    "PayloadError": "fedtrain.transport.payload",
    "decode_payload": "fedtrain.transport.payload",
    "encode_payload": "fedtrain.transport.payload",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
