"""Telemetry: the consumers of request and batch events, attached to a model in one place.

Three observers (:class:`~studioserve.serving.observer.Observer`) hear every inference request
and every batch of the model stage: :class:`~.live.LiveSeries` (the status page's charts),
:class:`~.prometheus.PrometheusMetrics` (``GET /metrics``, when prometheus-client is
installed) and :class:`~.triton_stats.ModelStatistics` (Triton's statistics extension).
:class:`Telemetry` builds them for the server and attaches them to every model version the
repository serves (one Triton statistics per version; the status page's series and the
Prometheus metrics for the whole server, with per-model families).

The three are bulk observers: a request only appends one record to :attr:`Telemetry.observers`
(no lock), and a flush hands them the records grouped. Batches are buffered the same way: the
pipe listener appends the event (and the time it finished), and :meth:`Telemetry.flush`
delivers the batches, then the requests. Every reader flushes first (the live series'
``snapshot``, each statistics' ``json``, every collection of the Prometheus registry), the
runtime's monitor thread flushes a few times a second (off the request path), and a batch
listener does once :data:`FLUSH_AT` batches or records wait; the request that fills the
buffer (:data:`~studioserve.serving.observer.DEFAULT_BOUND`) flushes it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from ..pipelines import BatchEvent
from ..serving.observer import Deferred, Observers, RequestDigest
from ..serving.repository import ServedVersion
from ..serving.service import ModelService
from .live import LiveSeries as LiveSeries
from .prometheus import PrometheusMetrics as PrometheusMetrics
from .prometheus import prometheus_available
from .triton_stats import ModelStatistics as ModelStatistics

logger = logging.getLogger(__name__)

__all__ = ["FLUSH_AT", "LiveSeries", "ModelStatistics", "PrometheusMetrics", "Telemetry"]

#: Buffered requests at which a batch listener delivers them (enough that a flush's fixed
#: cost is small per request).
FLUSH_AT: Final = 256


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
        #: batches not yet delivered: (deliver, event, when it finished)
        self._batches: Deferred[tuple[Callable[[BatchEvent, float], None], BatchEvent, float]]
        self._batches = Deferred()
        flush = self.flush
        self.live = LiveSeries(None, flush=flush)
        self._stats: dict[tuple[str, int], ModelStatistics] = {}
        self._lock = threading.Lock()
        self.prometheus: PrometheusMetrics | None = None
        if prometheus_available():
            self.prometheus = PrometheusMetrics(
                service,
                experiment=experiment,
                started=started,
                shutdown_at=shutdown_at,
                flush=flush,
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
        stats = ModelStatistics(stage, version=served.version, flush=self.flush)
        with self._lock:
            self._stats[(served.name, served.version)] = stats
        pipe = model.pipe
        if pipe is None:
            return
        live = self.live
        prometheus = self.prometheus
        name = served.name
        observers = self.observers
        batches = self._batches
        clock = live._clock  # the series buckets batches by its own clock

        def deliver(event: BatchEvent, at: float) -> None:
            if event.stage == stage:
                live.on_batch(event, at)
                stats.on_batch(event)
            if prometheus is not None:
                prometheus.on_batch(event, name)

        def listener(event: BatchEvent) -> None:
            batches.append((deliver, event, clock()))
            if len(batches) >= FLUSH_AT or observers.pending >= FLUSH_AT:
                self.flush(wait=False)  # never waits on a reader's flush

        pipe.add_listener(listener)

    def flush(self, *, wait: bool = True) -> None:
        """Deliver the buffered batches, then the buffered requests, to every observer.

        :param wait: wait for a flush under way (a reader: its read then counts everything
            before it); else leave the work to that flush.
        """
        self._batches.drain(_deliver_batches, wait=wait)
        self.observers.flush(wait=wait)

    def statistics(self, served: ServedVersion) -> ModelStatistics:
        """The Triton statistics of one served version."""
        key = (served.name, served.version)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = ModelStatistics(
                    served.model.model_stage, version=served.version, flush=self.flush
                )
            return stats

    def forget(self, name: str, keep: set[int]) -> None:
        """Drop the statistics of versions of ``name`` not in ``keep`` (unloaded)."""
        self.flush()  # their buffered batches and requests first (not under the lock)
        with self._lock:
            for key in [k for k in self._stats if k[0] == name and k[1] not in keep]:
                del self._stats[key]


class _PerVersion:
    """Routes requests to the statistics of the version they ran on."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        if model is not None:
            self._telemetry.statistics(model).on_request(route, status, seconds)

    def on_requests(self, digest: RequestDigest) -> None:
        for model, part in digest.by_model().items():
            if model is not None:
                self._telemetry.statistics(model).on_requests(part)

    def on_batch(self, event: BatchEvent) -> None:  # batches come through the pipe listener
        pass


def _deliver_batches(
    batches: list[tuple[Callable[[BatchEvent, float], None], BatchEvent, float]],
) -> None:
    for deliver, event, at in batches:
        try:
            deliver(event, at)
        except Exception:  # an observer must never break a flush
            logger.exception("batch observer failed for %r", event)
