"""Framed update payloads: a JSON header (ids, codec, names, shapes, checksum) plus a body.

Layout: ``b"FTP1"`` | header length (uint32, big-endian) | UTF-8 JSON header | body.
The body is the concatenation of each tensor's codec bytes, in header order. Decoding checks
magic, lengths, the sha256 of the body and every tensor's size before touching values, and raises
:class:`PayloadError` naming the reason; it never returns garbage tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtrain.transport.codecs import get_codec

__all__ = ["FORMAT_VERSION", "Payload", "PayloadError", "decode_payload", "encode_payload"]

MAGIC = b"FTP1"
FORMAT_VERSION = 1
_MAX_HEADER = 64 << 20


class PayloadError(ValueError):
    """A payload is malformed, truncated, corrupted or inconsistent; the message says which."""


@dataclass(slots=True)
class Payload:
    """A decoded payload: header fields and tensors (fp32, original shapes)."""

    kind: str
    """What the tensors are: 'pseudo_grad', 'grad', 'update', 'weights'."""
    run_id: str
    """Run the payload belongs to."""
    round: int
    """Round the payload belongs to."""
    sender: str
    """Silo name, or 'coordinator'."""
    codec: str
    """Codec of the body."""
    tensors: dict[str, torch.Tensor]
    """Decoded tensors by parameter name."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Small JSON metadata (tokens, loss, steps ...)."""


def encode_payload(
    tensors: dict[str, torch.Tensor],
    *,
    codec: str,
    kind: str,
    run_id: str,
    round: int,
    sender: str,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """Serialise ``tensors`` through ``codec`` into one framed payload."""
    c = get_codec(codec)
    names = sorted(tensors)
    bodies = [c.encode(tensors[n].detach().reshape(-1).float()) for n in names]
    body = b"".join(bodies)
    header = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "run_id": run_id,
        "round": round,
        "sender": sender,
        "codec": codec,
        "names": names,
        "shapes": [list(tensors[n].shape) for n in names],
        "dtypes": [str(tensors[n].dtype).removeprefix("torch.") for n in names],
        "sizes": [len(b) for b in bodies],
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "meta": meta or {},
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack(">I", len(head)) + head + body


def _header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise PayloadError("not a fedtrain payload (bad magic or shorter than 8 bytes)")
    (hlen,) = struct.unpack(">I", bytes(data[4:8]))
    if hlen > _MAX_HEADER or 8 + hlen > len(data):
        raise PayloadError(f"truncated header: needs {hlen} bytes, {len(data) - 8} present")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"corrupted header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise PayloadError(
            f"unsupported payload format {header.get('format')!r}"
            if isinstance(header, dict)
            else "header is not an object"
        )
    return header, 8 + hlen


def decode_payload(data: bytes | memoryview) -> Payload:
    """Verify and decode a payload made by :func:`encode_payload`."""
    header, start = _header(data)
    try:
        names, shapes, sizes = header["names"], header["shapes"], header["sizes"]
        codec = get_codec(header["codec"])
        body_bytes, digest = int(header["body_bytes"]), header["body_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise PayloadError(f"header missing or invalid field: {e}") from None
    body = memoryview(data)[start:]
    if len(body) != body_bytes:
        raise PayloadError(
            f"body is {len(body)} bytes but the header says {body_bytes} (truncated or padded)"
        )
    if hashlib.sha256(body).hexdigest() != digest:
        raise PayloadError("body checksum mismatch (corrupted in transit or tampered)")
    if not (len(names) == len(shapes) == len(sizes)) or sum(sizes) != body_bytes:
        raise PayloadError("header tensor lists are inconsistent with the body size")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape, size in zip(names, shapes, sizes, strict=True):
        numel = math.prod(shape)
        if codec.encoded_size(numel) != size:
            raise PayloadError(
                f"tensor {name!r}: {size} bytes do not hold {numel} values in codec {codec.name}"
            )
        tensors[name] = codec.decode(body[offset : offset + size], numel).reshape(shape)
        offset += size
    return Payload(
        kind=str(header["kind"]),
        run_id=str(header["run_id"]),
        round=int(header["round"]),
        sender=str(header["sender"]),
        codec=codec.name,
        tensors=tensors,
        meta=dict(header.get("meta") or {}),
    )
