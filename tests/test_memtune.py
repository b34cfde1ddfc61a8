"""shared.memtune: the allocator and collector settings each service applies
at start-up, checked in a fresh interpreter (they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from shared import memtune
before = gc.get_threshold()
made = [[] for _ in range(1000)]  # start-up objects
memtune.calm_gc()
print(gc.get_freeze_count() >= 1000, before == gc.get_threshold(), gc.get_count()[0] < 1000)
print(memtune.keep_large_buffers())
"""


def test_calm_gc_freezes_start_up_objects() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out[:3] == ["True", "True", "True"]
    assert out[3] in ("True", "False")  # False only off glibc
