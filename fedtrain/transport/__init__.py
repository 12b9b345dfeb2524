"""Codecs, error feedback and framed (optionally signed) payloads for exchanged updates."""

from fedtrain.transport.codecs import CODECS, Codec, get_codec
from fedtrain.transport.payload import Payload, PayloadError, decode_payload, encode_payload

__all__ = [
    "CODECS",
    "Codec",
    "Payload",
    "PayloadError",
    "decode_payload",
    "encode_payload",
    "get_codec",
]
