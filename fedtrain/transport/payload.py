"""Framed update payloads: a JSON header (ids, codec, names, shapes, checksum) plus a body.

Layout: ``b"FTP1"`` | header length (uint32 BE) | UTF-8 JSON header | body | [64-byte Ed25519
signature over everything before it, when the header says ``signed``].
The body is each tensor's codec bytes, concatenated in header order. The header carries the
run id, round, sender and fragment, so a signed payload cannot be replayed into another round,
run or silo. Decoding checks magic, lengths, the header's sha256 (of its canonical JSON),
signature (when a key is given), the body's sha256 and every tensor's size BEFORE decoding
values; any failure raises :class:`PayloadError` (or its
subclass :class:`SignatureError`) with the reason — never garbage tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtrain.transport.codecs import Codec, get_codec
from fedtrain.transport.framing import (
    FORMAT_VERSION,
    MAGIC,
    SIGNATURE_BYTES,
    PayloadWriter,
    encode_payload,
    header_digest,
)

__all__ = [
    "FORMAT_VERSION",
    "LazyTensors",
    "Payload",
    "PayloadError",
    "PayloadWriter",
    "SignatureError",
    "decode_payload",
    "encode_payload",
    "header_digest",
    "read_header",
]

_MAX_HEADER = 64 << 20
_MAX_DIMS = 64
"""torch's limit on a tensor's dimensions."""


class PayloadError(ValueError):
    """A payload is malformed, truncated, corrupted or inconsistent; the message says which."""


class SignatureError(PayloadError):
    """A payload's signature is missing, from another key, or does not match its bytes."""


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
    tensors: Mapping[str, torch.Tensor]
    """Decoded tensors by parameter name (a :class:`LazyTensors` when decoded lazily)."""
    fragment: int | None = None
    """Fragment id (Streaming DiLoCo), or None for the whole model."""
    block_size: int = 64
    """Codec block size (a sparse codec's chunk)."""
    keep: int = 0
    """Values kept per chunk (sparse codecs; 0 for the others)."""
    signed: bool = False
    """Whether the payload carried a signature (verified if a key was given)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Small JSON metadata (tokens, loss, steps, acknowledgements ...)."""
    dtypes: dict[str, str] = field(default_factory=dict)
    """Each tensor's dtype at the sender before encoding ('float32' ...)."""

    @property
    def numel(self) -> int:
        """Number of values carried."""
        if isinstance(self.tensors, LazyTensors):
            return self.tensors.total_numel
        return sum(t.numel() for t in self.tensors.values())


@dataclass(frozen=True, slots=True)
class _Slot:
    shape: tuple[int, ...]
    numel: int
    offset: int
    size: int


class LazyTensors(Mapping[str, torch.Tensor]):
    """A verified payload's tensors, each decoded when it is read and not kept: a reader that
    goes through them one at a time holds one decoded tensor, never the whole update. Reading
    a tensor twice decodes it twice (and gives a new tensor each time)."""

    def __init__(
        self,
        codec: Codec,
        body: memoryview,
        slots: dict[str, _Slot],
        scales: tuple[float, ...] = (),
    ) -> None:
        self._codec = codec
        self._body = body
        self._slots = slots
        self._scales = scales

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self._slots[name]
        t = self._codec.decode(self._body[s.offset : s.offset + s.size], s.numel).reshape(s.shape)
        for scale in self._scales:  # the same products, in order, as scaling eagerly
            t = t * scale
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._slots[name].shape

    def malformed(self, name: str) -> str | None:
        """The codec's objection to ``name``'s body (e.g. repeated sparse indices), or None."""
        s = self._slots[name]
        return self._codec.malformed(self._body[s.offset : s.offset + s.size], s.numel)

    @property
    def total_numel(self) -> int:
        return sum(s.numel for s in self._slots.values())

    def all_finite(self, name: str) -> bool:
        """Whether ``name`` decodes to finite values (from the codec's scales where it can)."""
        if self._scales:
            return bool(torch.isfinite(self[name]).all())
        s = self._slots[name]
        return self._codec.all_finite(self._body[s.offset : s.offset + s.size], s.numel)

    def scaled(self, scale: float) -> LazyTensors:
        """The same tensors, each multiplied by ``scale`` when read."""
        return LazyTensors(self._codec, self._body, self._slots, (*self._scales, scale))


def read_header(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where the body starts (no body checks)."""
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise PayloadError("not a fedtrain payload (bad magic or shorter than 8 bytes)")
    (hlen,) = struct.unpack(">I", bytes(data[4:8]))
    if hlen > _MAX_HEADER or 8 + hlen > len(data):
        raise PayloadError(f"truncated header: needs {hlen} bytes, {len(data) - 8} present")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, ints > 4300 digits, deep nesting
        raise PayloadError(f"corrupted header: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise PayloadError("corrupted header: not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format {header.get('format')!r}")
    return header, 8 + hlen


@dataclass(kw_only=True, slots=True)
class _Fields:
    """A payload header's fields, each checked for its type (not yet against the body)."""

    names: list[Any]
    shapes: list[Any]
    sizes: list[Any]
    numels: list[Any]
    dtypes: list[Any]
    block: int
    codec: Codec
    body_bytes: int
    digest: str
    signed: bool
    run_id: str
    round: int
    sender: str
    kind: str
    fragment: int | None


def _header_fields(header: dict[str, Any]) -> _Fields:
    """The header's fields; a missing or mistyped one raises :class:`PayloadError`."""
    try:
        names, shapes, sizes, numels, dtypes = (
            _list(header, k) for k in ("names", "shapes", "sizes", "numels", "dtypes")
        )
        block = _int(header, "block_size")
        if not 1 <= block <= 1 << 20:
            raise ValueError(f"'block_size' {block} is outside [1, 1048576]")
        keep = header.get("keep", 0)
        if type(keep) is not int:
            raise ValueError(f"'keep' {keep!r} is not an integer")
        codec = get_codec(_str(header, "codec"), block_size=block, keep=keep)
        body_bytes, digest = _int(header, "body_bytes"), _str(header, "body_sha256")
        signed = header["signed"]
        run_id, rnd, sender = _str(header, "run_id"), _int(header, "round"), _str(header, "sender")
        kind = _str(header, "kind")
        fragment = header["fragment"]
        if not isinstance(signed, bool) or not (fragment is None or type(fragment) is int):
            raise ValueError("'signed' must be a boolean and 'fragment' null or an integer")
        if not all(isinstance(n, str) for n in names + dtypes) or len(set(names)) != len(names):
            raise ValueError("'names' and 'dtypes' must be lists of strings, names unique")
        if not all(type(v) is int and v >= 0 for v in sizes + numels) or body_bytes < 0:
            raise ValueError("'sizes', 'numels' and 'body_bytes' must be integers >= 0")
    except (KeyError, TypeError, ValueError) as e:
        raise PayloadError(f"header missing or invalid field: {e}") from None
    return _Fields(
        names=names,
        shapes=shapes,
        sizes=sizes,
        numels=numels,
        dtypes=dtypes,
        block=block,
        codec=codec,
        body_bytes=body_bytes,
        digest=digest,
        signed=signed,
        run_id=run_id,
        round=rnd,
        sender=sender,
        kind=kind,
        fragment=fragment,
    )


def _verified_body(
    data: bytes | bytearray | memoryview,
    start: int,
    f: _Fields,
    public_key: Ed25519PublicKey | None,
) -> memoryview:
    """The body, once the total length, the signature (with ``public_key``) and the body's
    sha256 check out."""
    tail = SIGNATURE_BYTES if f.signed else 0
    if len(data) != start + f.body_bytes + tail:
        raise PayloadError(
            f"payload is {len(data)} bytes but the header says {start + f.body_bytes + tail} "
            "(truncated or padded)"
        )
    if public_key is not None:
        if not f.signed:
            raise SignatureError(f"unsigned payload from {f.sender!r}; signatures are required")
        end = start + f.body_bytes
        try:
            public_key.verify(bytes(data[end:]), bytes(data[:end]))
        except InvalidSignature:
            raise SignatureError(
                f"signature does not verify for {f.sender!r} (another key, or modified)"
            ) from None
    body = memoryview(data)[start : start + f.body_bytes]
    if hashlib.sha256(body).hexdigest() != f.digest:
        raise PayloadError("body checksum mismatch (corrupted in transit or tampered)")
    return body


def _slots(f: _Fields) -> dict[str, _Slot]:
    """Where each tensor lies in the body, after its shape and size are checked."""
    n = len(f.names)
    if (
        not (len(f.shapes) == len(f.sizes) == len(f.numels) == len(f.dtypes) == n)
        or sum(f.sizes) != f.body_bytes
    ):
        raise PayloadError("header tensor lists are inconsistent with the body size")
    codec = f.codec
    slots: dict[str, _Slot] = {}
    offset = 0
    for name, shape, numel, size in zip(f.names, f.shapes, f.numels, f.sizes, strict=True):
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)
            or math.prod(max(d, 1) for d in shape) >= 1 << 63  # torch sizes are int64
        ):
            raise PayloadError(
                f"tensor {name!r}: shape {str(shape)[:200]} is not a tensor shape "
                f"(a list of at most {_MAX_DIMS} integers >= 0 fitting int64)"
            )
        if math.prod(shape) != numel:
            raise PayloadError(f"tensor {name!r}: shape {shape} does not hold {numel} values")
        if codec.encoded_size(numel) != size:
            raise PayloadError(
                f"tensor {name!r}: {size} bytes do not hold {numel} values in codec {codec.name}"
            )
        slots[name] = _Slot(tuple(shape), numel, offset, size)
        offset += size
    return slots


def decode_payload(
    data: bytes | bytearray | memoryview,
    *,
    public_key: Ed25519PublicKey | None = None,
    lazy: bool = False,
) -> Payload:
    """Verify and decode a payload made by :func:`encode_payload`.

    With ``public_key``, the payload must be signed by the matching private key. With ``lazy``,
    the tensors are a :class:`LazyTensors` over ``data`` (decoded when read).
    """
    header, start = read_header(data)
    if header.get("header_sha256") != header_digest(header):
        raise PayloadError("header checksum mismatch or missing (corrupted in transit or tampered)")
    f = _header_fields(header)
    body = _verified_body(data, start, f, public_key)
    slots = _slots(f)
    tensors: Mapping[str, torch.Tensor]
    if lazy:
        tensors = LazyTensors(f.codec, body, slots)
    else:
        try:
            tensors = {
                n: f.codec.decode(body[s.offset : s.offset + s.size], s.numel).reshape(s.shape)
                for n, s in slots.items()
            }
        except ValueError as e:
            raise PayloadError(f"body cannot be decoded: {e}") from None
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise PayloadError("header meta is not an object")
    return Payload(
        kind=f.kind,
        run_id=f.run_id,
        round=f.round,
        sender=f.sender,
        codec=f.codec.name,
        tensors=tensors,
        fragment=f.fragment,
        block_size=f.block,
        keep=int(getattr(f.codec, "keep", 0)),
        signed=f.signed,
        meta=meta,
        dtypes=dict(zip(f.names, f.dtypes, strict=True)),
    )


def _list(header: dict[str, Any], key: str) -> list[Any]:
    value = header[key]
    if not isinstance(value, list):
        raise ValueError(f"{key!r} is not a list")
    return value


def _int(header: dict[str, Any], key: str) -> int:
    value = header[key]
    if type(value) is not int:
        raise ValueError(f"{key!r} is not an integer")
    return value


def _str(header: dict[str, Any], key: str) -> str:
    value = header[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is not a string")
    return value
