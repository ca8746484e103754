"""``settle_heap``: what a serving process does to its garbage collector after start-up."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc, weakref
from gateway.server.runtime import YOUNG_OBJECTS, settle_heap

class Node:
    pass

settle_heap()
assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == YOUNG_OBJECTS
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after start-up, then dropped
gone = weakref.ref(a)
del a, b
junk = [[] for _ in range(YOUNG_OBJECTS + 1000)]  # young objects alive: a collection runs
assert gone() is None, "a cycle made after start-up is still collected"
print("ok")
"""


def test_a_settled_heap_still_collects_cycles_made_after_start_up() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
