"""Codecs, error feedback and framed (optionally signed) payloads.

Names are imported lazily so that light importers (the mailbox ClientApp, which starts once
per message) do not import torch.
"""

from __future__ import annotations

from fedtrain._lazy import lazy

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


__getattr__ = lazy(__name__, _WHERE)
