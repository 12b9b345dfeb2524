"""Codecs and framed payloads for updates exchanged between silos and the coordinator."""

from fedtrain.transport.codecs import CODECS, Codec, Fp32Codec, get_codec
from fedtrain.transport.payload import Payload, PayloadError, decode_payload, encode_payload

__all__ = [
    "CODECS",
    "Codec",
    "Fp32Codec",
    "Payload",
    "PayloadError",
    "decode_payload",
    "encode_payload",
    "get_codec",
]
