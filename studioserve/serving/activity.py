"""Counting in-flight inference requests and remembering the last accepted one.

The inactivity timer (``--killafter``, :class:`studioserve.runtime.ModelServer`) and the
drain on shutdown read it; only accepted inference requests touch it, never probes, metrics,
the status page or requests refused for auth.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Activity"]


class Activity:
    """In-flight and accepted inference requests, and when the last one began or ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last = time.monotonic()
        self.accepted = 0

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.accepted += 1
            self._last = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._last = time.monotonic()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def idle_seconds(self) -> float:
        """Seconds since the last accepted request began or ended; 0 while any is in flight."""
        with self._lock:
            if self._in_flight:
                return 0.0
            return time.monotonic() - self._last
