"""Shared-file helpers: a log read from an offset, a lock held for a lifetime."""

from __future__ import annotations

import os

from fedtrain.runtime.files import file_size, hold_lock, read_since


def test_read_since_returns_only_what_was_appended(tmp_path):
    log = tmp_path / "x.log"
    assert file_size(log) == 0 and read_since(log, 0) == b""
    log.write_bytes(b"old\n")
    start = file_size(log)
    with log.open("ab") as f:
        f.write(b"new\n")
    assert start == 4 and read_since(log, start) == b"new\n"


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    path = tmp_path / "run" / "server.lock"
    first = hold_lock(path)
    assert first is not None and path.read_text() == f"{os.getpid()}\n"
    assert hold_lock(path) is None  # another open file description: flock refuses it
    assert hold_lock(path, wait_s=0.6) is None
    first.close()
    again = hold_lock(path)
    assert again is not None
    again.close()
