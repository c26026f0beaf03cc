"""What the server is doing, as numbers: Prometheus metrics at ``GET /metrics`` and the live
series the status page draws.

Both are fed the same way: every inference request (``POST /`` and the Open Inference
Protocol's infer) reports ``(route, status, seconds)`` through ``AppState.observers``, and the
model's :class:`~studioserve.pipelines.ModelPipe` reports every batch to a listener. Gauges
(queue depth, in flight, seconds until the inactivity shutdown) are read when scraped.

Prometheus metrics (each app has its own registry, so several servers in one process do not
clash)::

    studioserve_requests_total{route,status}            inference requests answered
    studioserve_request_duration_seconds{route}         end-to-end latency (histogram)
    studioserve_queue_wait_seconds{stage}               per item, in the stage's queue
    studioserve_compute_seconds{stage}                  per batch, in the stage's function
    studioserve_batch_size{stage}                       rows per batch (histogram)
    studioserve_queue_depth{stage}                      items waiting now
    studioserve_batch_limit{stage}                      the current batch bound in rows
    studioserve_in_flight_requests                      inference requests being served
    studioserve_pipe_in_flight_items                    items inside the pipe
    studioserve_accepted_requests_total                 requests that reset the inactivity timer
    studioserve_model_load_seconds                      loading and warm-up time
    studioserve_model_ready                             1 once the model is warm
    studioserve_shutdown_in_seconds                     until the inactivity shutdown (absent
                                                        when --killafter is 0)
    studioserve_uptime_seconds
    studioserve_model_info{experiment,kind,source}      always 1

Without ``prometheus-client`` installed there is no ``/metrics`` (a debug log says so); the
status page's live series work regardless.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from .oip import model_stage

if TYPE_CHECKING:
    from flask import Flask, Response

    from .server import AppState

logger = logging.getLogger(__name__)

__all__ = ["LATENCY_BUCKETS", "LiveSeries", "live_series_of", "register"]

#: Histogram bounds (seconds) of the latency metrics: 100 us to a minute.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
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

    :param stage: the pipe stage whose batches count (the model stage), or None to count none.
    :param window: seconds kept.
    :param clock: ``time.time`` (replaceable in tests).
    """

    def __init__(self, stage: str | None, *, window: int = 120, clock: Any = time.time) -> None:
        self.stage = stage
        self.window = window
        self._clock = clock
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

    def on_request(self, route: str, status: int, seconds: float) -> None:
        """An inference request finished (an ``AppState`` observer)."""
        i = bisect.bisect_left(_LIVE_BOUNDS, seconds)
        with self._lock:
            sec = self._at(self._clock())
            sec.requests += 1
            self.requests += 1
            if status >= 400:
                sec.errors += 1
                self.errors += 1
            else:
                sec.hist[i] += 1
                self._hist[i] += 1

    def on_batch(self, event: Any) -> None:
        """A pipe batch finished (a ModelPipe listener)."""
        if event.stage != self.stage:
            return
        with self._lock:
            sec = self._at(self._clock())
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


def live_series_of(app: Flask) -> LiveSeries | None:
    """The app's :class:`LiveSeries`, if :func:`register` ran."""
    series: LiveSeries | None = app.extensions.get("studioserve.live")
    return series


def _buckets_for(max_batch_size: int) -> list[float]:
    out = [1.0]
    while out[-1] < max_batch_size:
        out.append(min(out[-1] * 2, float(max_batch_size)))
    return out


class _Metrics:
    """The Prometheus side: its registry, instruments and scrape-time gauges."""

    def __init__(self, state: AppState, stage: str | None) -> None:
        import prometheus_client as pc
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.pc = pc
        self.state = state
        self.registry = pc.CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = pc.Counter(
            "studioserve_requests",
            "Inference requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=reg,
        )
        self.latency = pc.Histogram(
            "studioserve_request_duration_seconds",
            "End-to-end time of inference requests in the server.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = pc.Histogram(
            "studioserve_queue_wait_seconds",
            "Time each item waited in a pipe stage's queue.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.compute = pc.Histogram(
            "studioserve_compute_seconds",
            "Time a pipe stage's function took per batch.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        pipe = state.service.model.pipe
        max_batch = int(getattr(pipe, "max_batch_size", 1) or 1)
        self.batch_size = pc.Histogram(
            "studioserve_batch_size",
            "Rows per batch a pipe stage computed.",
            ["stage"],
            buckets=_buckets_for(max_batch),
            registry=reg,
        )
        self._children: dict[str, tuple[Any, Any, Any]] = {}
        self._route_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, int], Any] = {}

        model = state.service.model
        metrics = self

        class _Gauges:
            def collect(self) -> Iterator[Any]:
                return metrics.gauges(GaugeMetricFamily, CounterMetricFamily)

        reg.register(_Gauges())  # type: ignore[arg-type]
        pc.Info("studioserve_model", "The model being served.", registry=reg).info(
            {
                "experiment": str(state.info.get("experiment", "")),
                "kind": model.kind,
                "source": model.source,
                "model_stage": stage or "",
            }
        )

    def on_request(self, route: str, status: int, seconds: float) -> None:
        counter = self._request_children.get((route, status))
        if counter is None:
            counter = self._request_children[(route, status)] = self.requests.labels(
                route, str(status)
            )
        counter.inc()
        child = self._route_children.get(route)
        if child is None:
            child = self._route_children[route] = self.latency.labels(route)
        child.observe(seconds)

    def on_batch(self, event: Any) -> None:
        children = self._children.get(event.stage)
        if children is None:
            children = self._children[event.stage] = (
                self.queue_wait.labels(event.stage),
                self.compute.labels(event.stage),
                self.batch_size.labels(event.stage),
            )
        wait, compute, size = children
        for w in event.queue_waits:
            wait.observe(w)
        compute.observe(event.compute_seconds)
        size.observe(event.rows)

    def gauges(self, gauge: Any, counter: Any) -> Iterator[Any]:
        state = self.state
        service = state.service
        model = service.model
        yield _single(
            gauge,
            "studioserve_in_flight_requests",
            "Inference requests being served now.",
            service.activity.in_flight,
        )
        yield _single(
            counter,
            "studioserve_accepted_requests",
            "Inference requests accepted (each restarts the inactivity timer).",
            service.activity.accepted,
        )
        yield _single(
            gauge,
            "studioserve_model_load_seconds",
            "Seconds loading and warming the model took.",
            model.load_seconds,
        )
        yield _single(
            gauge, "studioserve_model_ready", "1 once the model is warm.", int(service.ready)
        )
        yield _single(
            gauge,
            "studioserve_uptime_seconds",
            "Seconds since the server started.",
            time.time() - state.started,
        )
        at = state.shutdown_at()
        if at is not None:
            yield _single(
                gauge,
                "studioserve_shutdown_in_seconds",
                "Seconds until the inactivity timer (--killafter) shuts the server down.",
                max(0.0, at - time.monotonic()),
            )
        pipe = model.pipe
        if pipe is None:
            return
        try:
            stats = pipe.stats()
        except Exception:
            logger.debug("pipe stats failed", exc_info=True)
            return
        yield _single(
            gauge,
            "studioserve_pipe_in_flight_items",
            "Items inside the model pipe now.",
            stats.in_flight,
        )
        depth = gauge(
            "studioserve_queue_depth", "Items waiting in a pipe stage's queue.", labels=["stage"]
        )
        limit = gauge(
            "studioserve_batch_limit",
            "A pipe stage's current batch bound (rows).",
            labels=["stage"],
        )
        for s in stats.stages.values():
            depth.add_metric([s.name], s.queue_depth)
            limit.add_metric([s.name], s.batch_limit)
        yield depth
        yield limit

    def exposition(self) -> tuple[bytes, str]:
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST


def _single(kind: Any, name: str, doc: str, value: float) -> Any:
    return kind(name, doc, value=value)


def register(app: Flask, state: AppState) -> None:
    """Feed the live series and, with prometheus-client installed, serve ``GET /metrics``."""
    pipe = state.service.model.pipe
    stage = model_stage(pipe)
    series = LiveSeries(stage)
    app.extensions["studioserve.live"] = series
    state.observers.append(series.on_request)
    if pipe is not None:
        pipe.add_listener(series.on_batch)
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        logger.debug("prometheus-client is not installed: no /metrics (pip install it to get it)")
        return
    from flask import Response

    metrics = _Metrics(state, stage)
    app.extensions["studioserve.metrics"] = metrics
    state.observers.append(metrics.on_request)
    if pipe is not None:
        pipe.add_listener(metrics.on_batch)

    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, status=200, content_type=content_type)

    app.add_url_rule("/metrics", "metrics", prometheus, methods=["GET"])
