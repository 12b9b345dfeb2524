"""The silo daemon's local API: one request, one reply, over a Unix socket in the work dir.

A frame is ``b"FTL1"`` | header length (uint32 BE) | UTF-8 JSON header | blobs. The header names
each blob and its size (``"blobs": [[name, size], ...]``); blobs follow back to back, streamed
straight from/into the socket (no base64, no extra copy of large payloads beyond the one
``bytes`` object each side needs). This module imports no torch: the mailbox ClientApp that uses
it starts once per Flower message.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["LocalAPIError", "read_frame", "request", "write_frame"]

MAGIC = b"FTL1"
_MAX_HEADER = 16 << 20
_CHUNK = 1 << 20


class LocalAPIError(RuntimeError):
    """The daemon could not be reached or answered with a malformed frame."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, _CHUNK))
        if k == 0:
            raise LocalAPIError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def write_frame(sock: socket.socket, header: dict[str, Any], blobs: dict[str, bytes]) -> int:
    """Send one frame; return the bytes written."""
    head = json.dumps({**header, "blobs": [[k, len(v)] for k, v in blobs.items()]}).encode()
    sock.sendall(MAGIC + struct.pack(">I", len(head)) + head)
    for blob in blobs.values():
        sock.sendall(blob)
    return 8 + len(head) + sum(len(b) for b in blobs.values())


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Receive one frame: ``(header, blobs)``."""
    prefix = _recv_exact(sock, 8)
    if prefix[:4] != MAGIC:
        raise LocalAPIError("not a fedtrain local API frame")
    (size,) = struct.unpack(">I", prefix[4:])
    if size > _MAX_HEADER:
        raise LocalAPIError(f"header of {size} bytes is too large")
    header = json.loads(_recv_exact(sock, size))
    blobs = {str(name): _recv_exact(sock, int(n)) for name, n in header.pop("blobs", [])}
    return header, blobs


def request(
    path: str, header: dict[str, Any], blobs: dict[str, bytes], timeout_s: float | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Send ``header``/``blobs`` to the daemon listening on ``path``; return its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise LocalAPIError(f"trainer daemon not reachable at {path}: {e}") from None
        write_frame(sock, header, blobs)
        return read_frame(sock)
    except (TimeoutError, OSError) as e:
        raise LocalAPIError(f"trainer daemon at {path}: {e}") from None
    finally:
        sock.close()
