"""Give freed request memory back to the operating system (glibc's malloc; a no-op elsewhere).

A server process allocates and frees large buffers all day: request bodies, decoded arrays,
batches. glibc's malloc keeps freed memory in its heaps unless told otherwise, and two of its
defaults make a long-running server's RSS creep up under mixed traffic:

- the *dynamic mmap threshold*: a freed mmap'ed block raises the threshold to its size (up to
  32 MiB on 64-bit), so later large buffers come from the heap, which fragments and is
  returned only from its top;
- one arena per thread, up to 8 per core: each HTTP and worker thread's frees stay in its
  own arena.

:func:`tune` fixes the mmap threshold at :data:`MMAP_THRESHOLD` (blocks at least that large are
mapped and unmapped on free, always) and bounds the arenas. :class:`Trimmer` calls
``malloc_trim(0)`` (which hands free pages of every arena back) at most once per interval, and
only after the process did some work, so an idle server costs nothing.

:func:`settle_gc` does the same for Python's cyclic garbage collector while a server runs: a
larger youngest generation, so a server answering thousands of requests a second is not paused
for a collection of its older generations every few hundred milliseconds (those pauses were
the slowest 1% of requests: bench/bench_server.py's p99). Nothing is frozen: a model unloaded
by a reload must still be collected. :func:`unsettle_gc` restores the thresholds once the last
server of the process has stopped.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "GC_THRESHOLDS",
    "MMAP_THRESHOLD",
    "Trimmer",
    "settle_gc",
    "trim",
    "tune",
    "unsettle_gc",
]

#: the collector's thresholds while serving: generation 0 collects every 20,000 net
#: allocations (Python's default is 700), the older generations as often, relatively, as ever
GC_THRESHOLDS = (20_000, 10, 10)

#: blocks of at least this many bytes are always mmap'ed, so freeing them returns them
MMAP_THRESHOLD = 1 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_libc: Any = None
_tuned = False


def _glibc() -> Any:
    """glibc, when this process runs on it (None on musl, macOS, Windows)."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
                    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    lib.malloc_trim.argtypes = [ctypes.c_size_t]
                    _libc = lib
            except OSError:
                pass
    return _libc or None


def settle_gc() -> None:
    """Use :data:`GC_THRESHOLDS` while a server runs (call :func:`unsettle_gc` when it stops)."""
    global _saved_gc
    with _gc_lock:
        if _saved_gc is None:
            _saved_gc = (gc.get_threshold(), 0)
            gc.set_threshold(*GC_THRESHOLDS)
        _saved_gc = (_saved_gc[0], _saved_gc[1] + 1)


def unsettle_gc() -> None:
    """Undo one :func:`settle_gc`; the last one restores the thresholds it found."""
    global _saved_gc
    with _gc_lock:
        if _saved_gc is None:
            return
        thresholds, count = _saved_gc
        if count <= 1:
            gc.set_threshold(*thresholds)
            _saved_gc = None
        else:
            _saved_gc = (thresholds, count - 1)


_gc_lock = threading.Lock()
_saved_gc: tuple[tuple[int, int, int], int] | None = None


def tune(arena_max: int | None = None) -> bool:
    """Fix the mmap threshold and bound the arenas (once per process); True on glibc.

    Settings from the environment win (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``).

    :param arena_max: the most malloc arenas (default: twice the CPU count, at least 4).
    """
    global _tuned
    lib = _glibc()
    if lib is None:
        return False
    if _tuned:
        return True
    _tuned = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        lib.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ:
        lib.mallopt(_M_ARENA_MAX, arena_max or max(4, 2 * (os.cpu_count() or 1)))
    return True


def trim() -> None:
    """Hand free heap pages of every arena back to the operating system (glibc only)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


class Trimmer:
    """Calls :func:`trim` every ``interval`` seconds while the process is busy, from one thread.

    :param busy: returns a number that changes when work was done (e.g. requests accepted);
        an unchanged number skips the trim.
    :param interval: seconds between trims.
    """

    def __init__(self, busy: Any, interval: float = 5.0) -> None:
        self._busy = busy
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Trimmer:
        if _glibc() is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="studioserve-malloc-trim", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        last = self._busy()
        while not self._stop.wait(self._interval):
            now = self._busy()
            if now != last:
                last = now
                trim()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
