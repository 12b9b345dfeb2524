"""Writing framed payloads (the layout :mod:`fedtrain.transport.payload` documents and reads).

:class:`PayloadWriter` builds one payload in a single buffer allocated up front: every codec's
body size is known from the value count, and the header's two digests are fixed-length hex, so
the header is laid out with placeholder digests and rewritten in place once the body is hashed.
Tensors are encoded one at a time, in name order, straight into their slot: a caller can form
each tensor, encode it and drop it, and never holds the whole update next to its encoding.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.transport.codecs import get_codec, is_sparse

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SIGNATURE_BYTES",
    "PayloadWriter",
    "encode_payload",
    "header_digest",
]

MAGIC = b"FTP1"
FORMAT_VERSION = 1
SIGNATURE_BYTES = 64
_PLACEHOLDER = "0" * 64
"""Stands for a sha256 hex digest (same length) until the real one is known."""


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical JSON without its own digest."""
    fields = {k: v for k, v in header.items() if k != "header_sha256"}
    canonical = json.dumps(fields, separators=(",", ":"), sort_keys=True, allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _dumps(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")


class PayloadWriter:
    """One framed payload for tensors shaped like ``like`` (their values are not read),
    written by :meth:`write` in name order and closed by :meth:`finish`."""

    def __init__(
        self,
        like: Mapping[str, torch.Tensor],
        *,
        codec: str,
        kind: str,
        run_id: str,
        round: int,
        sender: str,
        meta: dict[str, Any] | None = None,
        block_size: int = 64,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        fragment: int | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        keep: int = 0,
    ) -> None:
        self.codec = get_codec(
            codec, block_size=block_size, stochastic=stochastic, generator=generator, keep=keep
        )
        self.names = sorted(like)
        numels = [like[n].numel() for n in self.names]
        sizes = [self.codec.encoded_size(k) for k in numels]
        self._header: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "run_id": run_id,
            "round": round,
            "sender": sender,
            "fragment": fragment,
            "codec": codec,
            "block_size": block_size,
            "names": self.names,
            "shapes": [list(like[n].shape) for n in self.names],
            "dtypes": [str(like[n].dtype).removeprefix("torch.") for n in self.names],
            "numels": numels,
            "sizes": sizes,
            "body_bytes": sum(sizes),
            "body_sha256": _PLACEHOLDER,
            "signed": signing_key is not None,
            "meta": meta or {},
            "header_sha256": _PLACEHOLDER,
        }
        if is_sparse(codec):  # only sparse payloads carry it: other headers stay as they were
            self._header["keep"] = keep
        self._head_len = len(_dumps(self._header))
        start = 8 + self._head_len
        self._slots: list[tuple[int, int]] = []
        for size in sizes:
            self._slots.append((start, size))
            start += size
        self._body_end = start
        self._key = signing_key
        self._buf = bytearray(start + (SIGNATURE_BYTES if signing_key is not None else 0))
        self._sha = hashlib.sha256()
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> memoryview:
        """Encode ``tensor`` (the next name in order) into its slot; returns the slot's bytes
        (what a receiver decodes for it)."""
        return self.fill(name, self.codec.encode(tensor.detach().reshape(-1)))

    def fill(self, name: str, data: bytes | bytearray | memoryview) -> memoryview:
        """Put ``data``, ``name``'s body already encoded with this codec, into its slot."""
        if self._next >= len(self.names) or self.names[self._next] != name:
            want = repr(self.names[self._next]) if self._next < len(self.names) else "nothing"
            raise ValueError(
                f"payload tensors are written in name order: expected {want}, got {name!r}"
            )
        start, size = self._slots[self._next]
        if len(data) != size:
            raise ValueError(f"{name}: {len(data)} encoded bytes, {size} expected")
        view = memoryview(self._buf)[start : start + size]
        view[:] = data
        self._sha.update(data)
        self._next += 1
        return view

    def finish(self) -> bytearray:
        """The framed (and, with a key, signed) payload; every tensor must have been written."""
        if self._next != len(self.names):
            raise ValueError(f"payload incomplete: {self.names[self._next]} not written")
        header = self._header
        header["body_sha256"] = self._sha.hexdigest()
        header["header_sha256"] = header_digest(header)
        head = _dumps(header)
        assert len(head) == self._head_len  # the digests replaced same-length placeholders
        buf = self._buf
        buf[:8] = MAGIC + struct.pack(">I", len(head))
        buf[8 : 8 + len(head)] = head
        if self._key is not None:
            with memoryview(buf) as view:
                signature = self._key.sign(view[: self._body_end])
            buf[self._body_end :] = signature
        return buf


def encode_payload(
    tensors: Mapping[str, torch.Tensor],
    *,
    codec: str,
    kind: str,
    run_id: str,
    round: int,
    sender: str,
    meta: dict[str, Any] | None = None,
    block_size: int = 64,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    fragment: int | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    keep: int = 0,
) -> bytes:
    """Serialise ``tensors`` through ``codec`` into one framed (optionally signed) payload."""
    writer = PayloadWriter(
        tensors,
        codec=codec,
        kind=kind,
        run_id=run_id,
        round=round,
        sender=sender,
        meta=meta,
        block_size=block_size,
        stochastic=stochastic,
        generator=generator,
        fragment=fragment,
        signing_key=signing_key,
        keep=keep,
    )
    for name in writer.names:
        writer.write(name, tensors[name])
    return bytes(writer.finish())
