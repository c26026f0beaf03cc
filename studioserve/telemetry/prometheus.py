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

The only module that imports ``prometheus_client`` (inside :class:`PrometheusMetrics`); without
it there is no ``/metrics`` (:func:`prometheus_available` says so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from ..pipelines import BatchEvent
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
    """

    def __init__(
        self,
        service: ModelService,
        *,
        experiment: str,
        started: float,
        shutdown_at: Callable[[], float | None],
    ) -> None:
        import prometheus_client as pc
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.pc = pc
        self.service = service
        self.started = started
        self.shutdown_at = shutdown_at
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
        self._children: dict[str, tuple[Any, Any, Any]] = {}
        self._route_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, int], Any] = {}
        self._model_children: dict[tuple[str, int, int], Any] = {}
        self._instance_children: dict[tuple[str, int], tuple[Any, Any]] = {}

        metrics = self

        class _Gauges:
            def collect(self) -> Iterator[Any]:
                return metrics.gauges(GaugeMetricFamily, CounterMetricFamily)

        reg.register(_Gauges())  # type: ignore[arg-type]
        self.experiment = experiment

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        if model is not None:
            key = (model.name, model.version, status)
            child = self._model_children.get(key)
            if child is None:
                child = self._model_children[key] = self.model_requests.labels(
                    model.name, str(model.version), str(status)
                )
            child.inc()
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

    def on_batch(self, event: BatchEvent, model: str | None = None) -> None:
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
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST


def _single(kind: Any, name: str, doc: str, value: float) -> Any:
    return kind(name, doc, value=value)


def _ready(service: ModelService) -> list[Any]:
    return [m for m in service.repository.models() if m.latest is not None]
