"""Per-second series of the last minutes, for the status page's live charts.

A :class:`LiveSeries` is a bulk observer (:class:`~studioserve.serving.observer.BulkObserver`):
it counts requests, errors and a latency histogram per second from ``on_requests`` (each
flush's digest, grouped by second; ``on_request`` counts one at the clock's time), and rows
and model calls of the model stage from ``on_batch``; :meth:`LiveSeries.snapshot` is what
``GET /`` (JSON) returns under ``live`` and the page polls (it flushes the buffered requests
first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

from ..pipelines import BatchEvent
from ..serving.observer import RequestDigest

__all__ = ["LiveSeries"]

# Finer bounds for the live percentiles: 50 us growing by 10% (about 5% error) up to ~2 min.
_LIVE_BOUNDS: Final = tuple(5e-5 * 1.1**i for i in range(156))


def _quantile(hist: list[int], total: int, q: float) -> float | None:
    """The ``q`` quantile (seconds) of a histogram over :data:`_LIVE_BOUNDS` (bucket middle)."""
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            hi = _LIVE_BOUNDS[min(i, len(_LIVE_BOUNDS) - 1)]
            lo = _LIVE_BOUNDS[i - 1] if 0 < i < len(_LIVE_BOUNDS) else hi / 1.1
            return (lo + hi) / 2
    return _LIVE_BOUNDS[-1]


class _Second:
    __slots__ = ("batches", "errors", "hist", "items", "requests", "rows", "t")

    def __init__(self, t: int) -> None:
        self.t = t
        self.requests = 0
        self.errors = 0
        self.items = 0
        self.batches = 0
        self.rows = 0
        self.hist = [0] * (len(_LIVE_BOUNDS) + 1)


class LiveSeries:
    """Per-second counts of the last ``window`` seconds, for the status page's charts.

    :param stage: the pipe stage whose batches count (the model stage), or None to count every
        batch it is given (the telemetry then passes only model stages' batches).
    :param window: seconds kept.
    :param clock: ``time.time`` (replaceable in tests).
    :param flush: called before every read, to deliver the requests still buffered
        (:meth:`~studioserve.serving.observer.Observers.flush`).
    """

    def __init__(
        self,
        stage: str | None,
        *,
        window: int = 120,
        clock: Any = time.time,
        flush: Callable[[], object] | None = None,
    ) -> None:
        self.stage = stage
        self.window = window
        self._clock = clock
        self.flush = flush
        self._lock = threading.Lock()
        self._seconds: dict[int, _Second] = {}
        self.requests = 0
        self.errors = 0
        self.rows = 0
        self.batches = 0
        self._hist = [0] * (len(_LIVE_BOUNDS) + 1)

    def _at(self, now: float) -> _Second:
        t = int(now)
        sec = self._seconds.get(t)
        if sec is None:
            sec = self._seconds[t] = _Second(t)
            if len(self._seconds) > self.window + 2:
                for old in sorted(self._seconds)[: len(self._seconds) - self.window - 2]:
                    del self._seconds[old]
        return sec

    def on_request(self, route: str, status: int, seconds: float, model: Any = None) -> None:
        """An inference request finished (to any model), now by the series' clock."""
        self.on_requests(RequestDigest.of([(route, status, seconds, model, self._clock())]))

    def on_requests(self, digest: RequestDigest) -> None:
        """Requests finished (to any model), each counted in the second it was answered."""
        counted = []
        for group in digest.groups:
            # the buckets outside the lock: only the additions take it
            hist = None if group.status >= 400 else group.histogram(_LIVE_BOUNDS)
            counted.append((group.second, len(group.seconds), hist))
        with self._lock:
            for second, n, hist in counted:
                sec = self._at(second)
                sec.requests += n
                self.requests += n
                if hist is None:
                    sec.errors += n
                    self.errors += n
                else:
                    for hists in (sec.hist, self._hist):
                        for i, k in hist.items():
                            hists[i] += k

    def on_batch(self, event: BatchEvent, at: float | None = None) -> None:
        """A pipe batch finished (at ``at``, by the series' clock; default: now)."""
        if self.stage is not None and event.stage != self.stage:
            return
        with self._lock:
            sec = self._at(self._clock() if at is None else at)
            sec.batches += 1
            sec.rows += event.rows
            sec.items += event.size
            self.batches += 1
            self.rows += event.rows

    def snapshot(self, seconds: int = 60) -> dict[str, Any]:
        """The last ``seconds`` complete seconds, oldest first, and totals.

        Lists are aligned with ``t`` (Unix seconds): ``requests`` and ``errors`` per second,
        ``p50_ms``/``p99_ms`` of successful requests (None in a second without any),
        ``batch_mean`` rows per model call (None without calls), ``rows`` computed.
        """
        if self.flush is not None:
            self.flush()  # not under the lock: the flush takes it to deliver
        with self._lock:
            end = int(self._clock())  # the current second is still filling: leave it out
            start = end - min(seconds, self.window)
            out: dict[str, list[Any]] = {
                k: [] for k in ("t", "requests", "errors", "p50_ms", "p99_ms", "batch_mean", "rows")
            }
            for t in range(start, end):
                sec = self._seconds.get(t) or _Second(t)
                ok = sec.requests - sec.errors
                p50 = _quantile(sec.hist, ok, 0.5)
                p99 = _quantile(sec.hist, ok, 0.99)
                out["t"].append(t)
                out["requests"].append(sec.requests)
                out["errors"].append(sec.errors)
                out["p50_ms"].append(None if p50 is None else round(p50 * 1000, 3))
                out["p99_ms"].append(None if p99 is None else round(p99 * 1000, 3))
                out["batch_mean"].append(round(sec.rows / sec.batches, 2) if sec.batches else None)
                out["rows"].append(sec.rows)
            recent = self._recent(end, 10)
            ok_total = self.requests - self.errors
            p50 = _quantile(self._hist, ok_total, 0.5)
            p99 = _quantile(self._hist, ok_total, 0.99)
            totals = {
                "requests": self.requests,
                "errors": self.errors,
                "rows": self.rows,
                "batches": self.batches,
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            }
        return {"series": out, "totals": totals, "recent": recent}

    def _recent(self, end: int, seconds: int) -> dict[str, Any]:
        """Merged figures of the ``seconds`` complete seconds before ``end`` (under the lock)."""
        hist = [0] * (len(_LIVE_BOUNDS) + 1)
        requests = errors = rows = batches = 0
        for t in range(end - seconds, end):
            sec = self._seconds.get(t)
            if sec is None:
                continue
            requests += sec.requests
            errors += sec.errors
            rows += sec.rows
            batches += sec.batches
            for i, n in enumerate(sec.hist):
                if n:
                    hist[i] += n
        p50 = _quantile(hist, requests - errors, 0.5)
        p99 = _quantile(hist, requests - errors, 0.99)
        return {
            "seconds": seconds,
            "requests": requests,
            "errors": errors,
            "rps": round(requests / seconds, 2),
            "rows_per_second": round(rows / seconds, 2),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "batch_mean": round(rows / batches, 2) if batches else None,
        }
