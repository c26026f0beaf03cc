"""Telemetry: the consumers of request and batch events, attached to a model in one place.

Three observers (:class:`~studioserve.serving.observer.Observer`) hear every inference request
and every batch of the model stage: :class:`~.live.LiveSeries` (the status page's charts),
:class:`~.prometheus.PrometheusMetrics` (``GET /metrics``, when prometheus-client is
installed) and :class:`~.triton_stats.ModelStatistics` (Triton's statistics extension).
:class:`Telemetry` builds them for the server and attaches them to every model version the
repository serves (one Triton statistics per version; the status page's series and the
Prometheus metrics for the whole server, with per-model families).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..pipelines import BatchEvent
from ..serving.observer import Observers
from ..serving.repository import ServedVersion
from ..serving.service import ModelService
from .live import LiveSeries as LiveSeries
from .prometheus import PrometheusMetrics as PrometheusMetrics
from .prometheus import prometheus_available
from .triton_stats import ModelStatistics as ModelStatistics

__all__ = ["LiveSeries", "ModelStatistics", "PrometheusMetrics", "Telemetry"]


class Telemetry:
    """The observers of every served model.

    Requests reach the observers through :attr:`observers`; batches through a listener this
    class adds to the pipe of each model version the repository publishes (its model
    stage's batches feed the status page's series and that version's Triton statistics;
    every stage's feed the Prometheus histograms).

    :param service: the model service (its repository is watched for new versions).
    :param experiment: the server's label (metrics' model info of a single model).
    :param started: when the server started (``time.time()``).
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
        self.observers = Observers(None)
        self.live = LiveSeries(None)
        self._stats: dict[tuple[str, int], ModelStatistics] = {}
        self._lock = threading.Lock()
        self.prometheus: PrometheusMetrics | None = None
        if prometheus_available():
            self.prometheus = PrometheusMetrics(
                service, experiment=experiment, started=started, shutdown_at=shutdown_at
            )
        self.observers.attach(self.live)
        self.observers.attach(_PerVersion(self))
        if self.prometheus is not None:
            self.observers.attach(self.prometheus)
        service.repository.subscribe(self._watch)

    def _watch(self, served: ServedVersion) -> None:
        """A version is about to serve: count its requests and its batches."""
        model = served.model
        stage = model.model_stage
        stats = ModelStatistics(stage, version=served.version)
        with self._lock:
            self._stats[(served.name, served.version)] = stats
        pipe = model.pipe
        if pipe is None:
            return
        live = self.live
        prometheus = self.prometheus
        name = served.name

        def listener(event: BatchEvent) -> None:
            if event.stage == stage:
                live.on_batch(event)
                stats.on_batch(event)
            if prometheus is not None:
                prometheus.on_batch(event, name)

        pipe.add_listener(listener)

    def statistics(self, served: ServedVersion) -> ModelStatistics:
        """The Triton statistics of one served version."""
        key = (served.name, served.version)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = ModelStatistics(
                    served.model.model_stage, version=served.version
                )
            return stats

    def forget(self, name: str, keep: set[int]) -> None:
        """Drop the statistics of versions of ``name`` not in ``keep`` (unloaded)."""
        with self._lock:
            for key in [k for k in self._stats if k[0] == name and k[1] not in keep]:
                del self._stats[key]


class _PerVersion:
    """Routes each request to the statistics of the version it ran on."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        if model is not None:
            self._telemetry.statistics(model).on_request(route, status, seconds)

    def on_batch(self, event: BatchEvent) -> None:  # batches come through the pipe listener
        pass
