"""The daemon's local socket protocol: frames round-trip exactly; failures are clear errors."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from fedtrain.protocol.localapi import LocalAPIError, read_frame, request, write_frame


def test_frame_round_trip_with_large_blob():
    a, b = socket.socketpair()
    blob = os.urandom(3 << 20)
    t = threading.Thread(
        target=write_frame, args=(a, {"op": "round", "n": 1}, {"x": blob, "e": b""})
    )
    t.start()
    header, blobs = read_frame(b)
    t.join()
    assert header == {"op": "round", "n": 1}
    assert blobs == {"x": blob, "e": b""}


def test_request_through_a_unix_socket(tmp_path):
    path = str(tmp_path / "d.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def echo():
        conn, _ = srv.accept()
        with conn:
            h, bl = read_frame(conn)
            write_frame(conn, {**h, "echo": True}, {k: v[::-1] for k, v in bl.items()})

    t = threading.Thread(target=echo)
    t.start()
    header, blobs = request(path, {"op": "hello"}, {"p": b"abc"})
    t.join()
    srv.close()
    assert header == {"op": "hello", "echo": True} and blobs == {"p": b"cba"}


def test_unreachable_daemon_and_garbage_are_named(tmp_path):
    with pytest.raises(LocalAPIError, match="not reachable"):
        request(str(tmp_path / "nobody.sock"), {}, {})
    a, b = socket.socketpair()
    a.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(LocalAPIError, match="not a fedtrain"):
        read_frame(b)
    a.close()
    b.close()
