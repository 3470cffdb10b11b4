"""Pausing Python's cyclic garbage collector around work that makes millions of objects and
keeps most of them (reading a large YAML file, a whole `policy apply`).

Such work sets off full collections again and again as the heap grows, and each walks
everything the process holds (the daemon's own deployment too): reading the bench's large
identities file took 13 s with the collector on and 4 s with it paused. Reference counting
frees everything as usual meanwhile; cycles made during the pause wait for the next
collection after it.
"""
from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0            # pauses in progress, on any thread
_resume = False       # whether the collector was on when the first of them began


@contextmanager
def collections_paused() -> Iterator[None]:
    """No cyclic collection until the last pause in progress (on any thread) ends; then the
    collector is as it was before the first began."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
