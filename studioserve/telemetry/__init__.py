"""Telemetry: the consumers of request and batch events, attached to a model in one place.

Three observers (:class:`~studioserve.serving.observer.Observer`) hear every inference request
and every batch of the model stage: :class:`~.live.LiveSeries` (the status page's charts),
:class:`~.prometheus.PrometheusMetrics` (``GET /metrics``, when prometheus-client is
installed) and :class:`~.triton_stats.ModelStatistics` (Triton's statistics extension).
:class:`Telemetry` builds them for one served model and attaches them.
"""

from __future__ import annotations

from collections.abc import Callable

from ..serving.observer import Observers
from ..serving.service import ModelService
from .live import LiveSeries as LiveSeries
from .prometheus import PrometheusMetrics as PrometheusMetrics
from .prometheus import prometheus_available
from .triton_stats import ModelStatistics as ModelStatistics

__all__ = ["LiveSeries", "ModelStatistics", "PrometheusMetrics", "Telemetry"]


class Telemetry:
    """The observers of one served model.

    :param service: the model service.
    :param experiment: the experiment key (metrics' model info).
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
        model = service.model
        stage = model.model_stage
        self.observers = Observers(model.pipe)
        self.live = LiveSeries(stage)
        self.triton = ModelStatistics(stage)
        self.prometheus: PrometheusMetrics | None = None
        if prometheus_available():
            self.prometheus = PrometheusMetrics(
                service, experiment=experiment, started=started, shutdown_at=shutdown_at
            )
        self.observers.attach(self.live)
        self.observers.attach(self.triton)
        if self.prometheus is not None:
            self.observers.attach(self.prometheus)
