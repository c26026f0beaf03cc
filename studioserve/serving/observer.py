"""The observer interface: what telemetry hears about requests and batches.

An :class:`Observer` is told about every inference request (``on_request``, by
:func:`studioserve.serving.inference.RequestHandler.handle`, whatever the protocol) and every
batch the model's pipe ran (``on_batch``, a pipe listener). :class:`Observers` is the one place
where observers are attached: it fans each request out to all of them and registers each as a
listener of the model's pipe. An observer that raises is logged and never breaks a request.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from ..pipelines import BatchEvent, ModelPipe
from .repository import ServedVersion

logger = logging.getLogger(__name__)

__all__ = ["Observer", "Observers"]


class Observer(Protocol):
    """A consumer of request and batch events (live series, Prometheus, Triton statistics)."""

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        """One inference request was answered: its route label, status, seconds taken and
        the model version it ran on (None when it was refused before one was resolved)."""

    def on_batch(self, event: BatchEvent) -> None:
        """The model's pipe ran one batch (called in the pipe's worker: keep it quick)."""


class Observers:
    """The observers of one served model.

    :param pipe: the model's pipe, if it has one (each observer becomes its listener).
    """

    def __init__(self, pipe: ModelPipe | None = None) -> None:
        self._pipe = pipe
        self._observers: list[Observer] = []
        self._calls: list[tuple[Observer, Callable[..., None], bool]] = []

    def attach(self, observer: Observer) -> None:
        """Tell ``observer`` about every request and every batch from now on.

        An observer whose ``on_request`` takes only ``(route, status, seconds)`` (written
        before servers had several models) is called without the model.
        """
        self._observers.append(observer)
        self._calls.append((observer, observer.on_request, _takes_model(observer.on_request)))
        if self._pipe is not None:
            self._pipe.add_listener(observer.on_batch)

    def __iter__(self) -> Iterator[Observer]:
        return iter(list(self._observers))

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        for observer, call, with_model in self._calls:
            try:
                if with_model:
                    call(route, status, seconds, model)
                else:
                    call(route, status, seconds)
            except Exception:  # an observer must never break a request
                logger.exception("request observer %r failed", observer)


def _takes_model(method: Callable[..., None]) -> bool:
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4
