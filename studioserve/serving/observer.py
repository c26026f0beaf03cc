"""The observer interface: what telemetry hears about requests and batches.

An :class:`Observer` is told about every inference request (``on_request``, by
:func:`studioserve.serving.inference.RequestHandler.handle`, whatever the protocol) and every
batch the model's pipe ran (``on_batch``, a pipe listener). :class:`Observers` is the one place
where observers are attached: it fans each request out to all of them and registers each as a
listener of the model's pipe. An observer that raises is logged and never breaks a request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

from ..pipelines import BatchEvent, ModelPipe

logger = logging.getLogger(__name__)

__all__ = ["Observer", "Observers"]


class Observer(Protocol):
    """A consumer of request and batch events (live series, Prometheus, Triton statistics)."""

    def on_request(self, route: str, status: int, seconds: float) -> None:
        """One inference request was answered: its route label, status and seconds taken."""

    def on_batch(self, event: BatchEvent) -> None:
        """The model's pipe ran one batch (called in the pipe's worker: keep it quick)."""


class Observers:
    """The observers of one served model.

    :param pipe: the model's pipe, if it has one (each observer becomes its listener).
    """

    def __init__(self, pipe: ModelPipe | None) -> None:
        self._pipe = pipe
        self._observers: list[Observer] = []

    def attach(self, observer: Observer) -> None:
        """Tell ``observer`` about every request and every batch from now on."""
        self._observers.append(observer)
        if self._pipe is not None:
            self._pipe.add_listener(observer.on_batch)

    def __iter__(self) -> Iterator[Observer]:
        return iter(list(self._observers))

    def on_request(self, route: str, status: int, seconds: float) -> None:
        for observer in self._observers:
            try:
                observer.on_request(route, status, seconds)
            except Exception:  # an observer must never break a request
                logger.exception("request observer %r failed", observer)
