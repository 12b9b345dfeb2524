"""The coordinator fixes glibc's mmap threshold (heap fragmentation), unless the user set it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = "from fedtrain.runtime.memory import limit_heap_fragmentation as f; print(f(), f())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_threshold_is_set_once_and_the_users_setting_wins():
    env_free = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env_free, capture_output=True, text=True
    )
    assert out.stdout.split() == ["True", "True"], out.stderr
    theirs = {**env_free, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=theirs, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
