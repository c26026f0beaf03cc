"""Prometheus metrics for ``GET /metrics``: an observer plus gauges read at scrape time.

Each server has its own registry, so several servers in one process do not clash::

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

Requests come in bulk (``on_requests``, each flush's digest): one ``inc(n)`` per counter and
one bulk update per latency histogram (:class:`_BulkHistogram`) a flush, not one call with its
locks a request; a batch's queue waits are one bulk update too. Every collection of the
registry (``GET /metrics``) flushes the buffered requests first (the first collector
registered), so a scrape counts every request answered before it.

The only module that imports ``prometheus_client`` (inside :class:`PrometheusMetrics`); without
it there is no ``/metrics`` (:func:`prometheus_available` says so).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Final

from ..pipelines import BatchEvent
from ..serving.observer import RequestDigest
from ..serving.repository import ServedModel, ServedVersion
from ..serving.service import ModelService

logger = logging.getLogger(__name__)

__all__ = ["LATENCY_BUCKETS", "PrometheusMetrics", "prometheus_available"]

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


def prometheus_available() -> bool:
    """Whether prometheus-client can be imported (else there is no ``/metrics``)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        logger.debug("prometheus-client is not installed: no /metrics (pip install it to get it)")
        return False
    return True


class _BulkHistogram:
    """One labelled child of a ``prometheus_client.Histogram``, fed many observations at once.

    ``observe(v)`` adds ``v`` to the sum and 1 to the first bucket whose bound is >= ``v``,
    each under its own lock. :meth:`observe_many` does the same for a whole list with one
    addition to the sum and one per bucket it touches: the exposed samples are those of
    ``observe`` one value at a time. prometheus-client has no public bulk call, so it uses the
    child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (checked once here); without them it
    falls back to ``observe`` per value.
    """

    __slots__ = ("_buckets", "_index", "_sum", "child")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        self._buckets: list[Any] | None = None
        self._sum: Any = None
        if (
            isinstance(bounds, list)
            and bounds
            and isinstance(buckets, list)
            and len(bounds) == len(buckets)
            and bounds[-1] == float("inf")
            and all(hasattr(b, "inc") for b in buckets)
            and hasattr(total, "inc")
        ):
            self._buckets = buckets
            self._sum = total
        self._index = partial(bisect_left, bounds or [float("inf")])

    def observe_many(self, values: Sequence[float]) -> None:
        """Observe every value of ``values``."""
        buckets = self._buckets
        if buckets is None:
            for v in values:
                self.child.observe(v)
            return
        if not values:
            return
        self._sum.inc(sum(values))
        for i, n in Counter(map(self._index, values)).items():
            buckets[i].inc(n)


def _buckets_for(max_batch_size: int) -> list[float]:
    out = [1.0]
    while out[-1] < max_batch_size:
        out.append(min(out[-1] * 2, float(max_batch_size)))
    return out


class PrometheusMetrics:
    """The Prometheus side: its registry, instruments and scrape-time gauges.

    :param service: the model service (gauges read its activity and readiness).
    :param experiment: the served experiment key (``studioserve_model_info``).
    :param started: the server's start (``time.time()``), for the uptime.
    :param shutdown_at: when the inactivity timer fires (``time.monotonic()``), or None.
    :param flush: called before every collection of the registry, to deliver the requests
        still buffered (:meth:`~studioserve.serving.observer.Observers.flush`).
    """

    def __init__(
        self,
        service: ModelService,
        *,
        experiment: str,
        started: float,
        shutdown_at: Callable[[], float | None],
        flush: Callable[[], object] | None = None,
    ) -> None:
        import prometheus_client as pc
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.pc = pc
        self.service = service
        self.started = started
        self.shutdown_at = shutdown_at
        self.flush = flush
        self.registry = pc.CollectorRegistry(auto_describe=True)
        reg = self.registry
        metrics = self

        class _Flush:
            """Registered first, so collected first: the instruments then read exact values."""

            def describe(self) -> list[Any]:
                return []

            def collect(self) -> list[Any]:
                if metrics.flush is not None:
                    metrics.flush()
                return []

        reg.register(_Flush())  # type: ignore[arg-type]
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
        max_batch = max(
            [int(getattr(m.latest.model.pipe, "max_batch_size", 1) or 1) for m in _ready(service)]
            or [1]
        )
        self.batch_size = pc.Histogram(
            "studioserve_batch_size",
            "Rows per batch a pipe stage computed.",
            ["stage"],
            buckets=_buckets_for(max_batch),
            registry=reg,
        )
        self.model_requests = pc.Counter(
            "studioserve_model_requests",
            "Inference requests answered, by model, version and HTTP status.",
            ["model", "version", "status"],
            registry=reg,
        )
        self.model_rows = pc.Counter(
            "studioserve_model_rows",
            "Rows (examples) the model stage of each model computed.",
            ["model"],
            registry=reg,
        )
        self.instance_executions = pc.Counter(
            "studioserve_instance_executions",
            "Batches each instance (replica) of a model's stage computed.",
            ["model", "instance"],
            registry=reg,
        )
        self._children: dict[str, tuple[_BulkHistogram, Any, Any]] = {}
        self._route_children: dict[str, _BulkHistogram] = {}
        self._request_children: dict[tuple[str, int], Any] = {}
        self._model_children: dict[tuple[str, int, int], Any] = {}
        self._instance_children: dict[tuple[str, int], tuple[Any, Any]] = {}

        class _Gauges:
            def collect(self) -> Iterator[Any]:
                return metrics.gauges(GaugeMetricFamily, CounterMetricFamily)

        reg.register(_Gauges())  # type: ignore[arg-type]
        self.experiment = experiment

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        self.on_requests(RequestDigest.of([(route, status, seconds, model, time.time())]))

    def on_requests(self, digest: RequestDigest) -> None:
        """One counter increment per route and status (and model, version and status), and one
        bulk histogram update per route, for all the digest's requests."""
        requests: dict[tuple[str, int], int] = {}
        per_model: dict[tuple[str, int, int], int] = {}
        latencies: dict[str, list[float]] = {}
        for group in digest.groups:
            n = len(group.seconds)
            key = (group.route, group.status)
            requests[key] = requests.get(key, 0) + n
            model = group.model
            if model is not None:
                mkey = (model.name, model.version, group.status)
                per_model[mkey] = per_model.get(mkey, 0) + n
            seconds = latencies.get(group.route)
            if seconds is None:
                latencies[group.route] = list(group.seconds)
            else:
                seconds += group.seconds
        for mkey, n in per_model.items():
            child = self._model_children.get(mkey)
            if child is None:
                name, version, status = mkey
                child = self._model_children[mkey] = self.model_requests.labels(
                    name, str(version), str(status)
                )
            child.inc(n)
        for key, n in requests.items():
            counter = self._request_children.get(key)
            if counter is None:
                counter = self._request_children[key] = self.requests.labels(key[0], str(key[1]))
            counter.inc(n)
        for route, seconds in latencies.items():
            hist = self._route_children.get(route)
            if hist is None:
                hist = self._route_children[route] = _BulkHistogram(self.latency.labels(route))
            hist.observe_many(seconds)

    def on_batch(self, event: BatchEvent, model: str | None = None) -> None:
        """One batch: a few increments, its items' queue waits as one bulk update."""
        if model is not None:
            instance = getattr(event, "instance", 0)
            pair = self._instance_children.get((model, instance))
            if pair is None:
                pair = self._instance_children[(model, instance)] = (
                    self.instance_executions.labels(model, str(instance)),
                    self.model_rows.labels(model),
                )
            pair[0].inc()
            pair[1].inc(event.rows)
        children = self._children.get(event.stage)
        if children is None:
            children = self._children[event.stage] = (
                _BulkHistogram(self.queue_wait.labels(event.stage)),
                self.compute.labels(event.stage),
                self.batch_size.labels(event.stage),
            )
        wait, compute, size = children
        wait.observe_many(event.queue_waits)
        compute.observe(event.compute_seconds)
        size.observe(event.rows)

    def gauges(self, gauge: Any, counter: Any) -> Iterator[Any]:
        service = self.service
        entries = service.repository.models()
        served = [v for m in entries for v in m.versions.values()]
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
            "Seconds loading and warming the served model versions took (all of them).",
            sum(v.model.load_seconds for v in served),
        )
        yield _single(
            gauge, "studioserve_model_ready", "1 once the server is warm.", int(service.ready)
        )
        yield _single(
            gauge,
            "studioserve_uptime_seconds",
            "Seconds since the server started.",
            time.time() - self.started,
        )
        at = self.shutdown_at()
        if at is not None:
            yield _single(
                gauge,
                "studioserve_shutdown_in_seconds",
                "Seconds until the inactivity timer (--killafter) shuts the server down.",
                max(0.0, at - time.monotonic()),
            )
        yield from self._model_gauges(gauge, counter, entries)
        stats_of = []
        for v in served:
            pipe = v.model.pipe
            if pipe is None:
                continue
            try:
                stats_of.append(pipe.stats())
            except Exception:
                logger.debug("pipe stats failed", exc_info=True)
        if not stats_of:
            return
        yield _single(
            gauge,
            "studioserve_pipe_in_flight_items",
            "Items inside the model pipes now.",
            sum(st.in_flight for st in stats_of),
        )
        depth = gauge(
            "studioserve_queue_depth", "Items waiting in a pipe stage's queue.", labels=["stage"]
        )
        limit = gauge(
            "studioserve_batch_limit",
            "A pipe stage's current batch bound (rows).",
            labels=["stage"],
        )
        depths: dict[str, int] = {}
        limits: dict[str, int] = {}
        for st in stats_of:
            for stage in st.stages.values():
                depths[stage.name] = depths.get(stage.name, 0) + stage.queue_depth
                limits[stage.name] = max(limits.get(stage.name, 0), stage.batch_limit)
        for name in depths:
            depth.add_metric([name], depths[name])
            limit.add_metric([name], limits[name])
        yield depth
        yield limit

    def _model_gauges(self, gauge: Any, counter: Any, entries: list[ServedModel]) -> Iterator[Any]:
        """Per model: info, versions ready, load failures, load seconds."""
        info = gauge(
            "studioserve_model_info",
            "The models being served (one sample per model: its newest served version).",
            labels=["experiment", "kind", "source", "model_stage"],
        )
        ready = gauge(
            "studioserve_version_ready",
            "1 for every model version that serves requests.",
            labels=["model", "version"],
        )
        load = gauge(
            "studioserve_version_load_seconds",
            "Seconds loading and warming each served model version took.",
            labels=["model", "version"],
        )
        failures = counter(
            "studioserve_model_load_failures",
            "Loads and reloads of each model that failed (the old version kept serving).",
            labels=["model"],
        )
        for entry in entries:
            failures.add_metric([entry.name], entry.failures)
            latest = entry.latest
            if latest is not None:
                m = latest.model
                info.add_metric([entry.name, m.kind, m.source, m.model_stage or ""], 1)
            for number, v in sorted(entry.versions.items()):
                ready.add_metric([entry.name, str(number)], 1)
                load.add_metric([entry.name, str(number)], v.model.load_seconds)
        yield info
        yield ready
        yield load
        yield failures

    def exposition(self) -> tuple[bytes, str]:
        if self.flush is not None:
            self.flush()  # the registry's first collector flushes too: for any other reader
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST


def _single(kind: Any, name: str, doc: str, value: float) -> Any:
    return kind(name, doc, value=value)


def _ready(service: ModelService) -> list[Any]:
    return [m for m in service.repository.models() if m.latest is not None]
