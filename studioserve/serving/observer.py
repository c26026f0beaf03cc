"""The observer interface: what telemetry hears about requests and batches.

An :class:`Observer` is told about every inference request (``on_request``, by
:func:`studioserve.serving.inference.RequestHandler.handle`, whatever the protocol) and every
batch the model's pipe ran (``on_batch``, a pipe listener). :class:`Observers` is the one place
where observers are attached: it registers each as a listener of the model's pipe and tells
them about requests. An observer that raises is logged and never breaks a request or a flush.

Requests are off the hot path: :meth:`Observers.on_request` only appends one tuple to a
:class:`Deferred` (a :class:`collections.deque`'s append, atomic under the GIL: safe from any
thread, an event loop's included; no lock; the telemetry buffers batch events in one too).
:meth:`Observers.flush` takes what was appended, groups it by route, status, model version and
second (a :class:`RequestDigest`) and hands that to every :class:`BulkObserver`
(``on_requests``) at once. Readers flush before they read (the telemetry wires its readers to
it), so any read counts every request answered before it; the buffer is also flushed when it
reaches ``bound`` records, so it stays bounded when nobody reads. An observer with only
``on_request`` (the old interface) is still called once per request, at once, as before.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Final, Generic, Protocol, TypeVar

from ..pipelines import BatchEvent, ModelPipe
from .repository import ServedVersion

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BOUND",
    "BulkObserver",
    "Deferred",
    "Observer",
    "Observers",
    "RequestDigest",
    "RequestGroup",
    "RequestRecord",
]

#: One answered request as buffered: route, status, seconds taken, the model version (None
#: when it was refused before one was resolved) and when it was answered (``time.time()``).
RequestRecord = tuple[str, int, float, ServedVersion | None, float]

#: Records buffered before the request that reaches the bound flushes them itself.
DEFAULT_BOUND: Final = 4096

_time = time.time


class RequestGroup:
    """The requests of one flush with the same route, status, model version and Unix second.

    :ivar seconds: each request's seconds taken, in the order they were answered.
    :ivar last_at: when the last of them was answered (``time.time()``).
    """

    __slots__ = ("last_at", "model", "route", "second", "seconds", "status")

    def __init__(
        self, route: str, status: int, model: ServedVersion | None, second: int, at: float
    ) -> None:
        self.route = route
        self.status = status
        self.model = model
        self.second = second
        self.seconds: list[float] = []
        self.last_at = at

    def __repr__(self) -> str:
        return (
            f"<RequestGroup {self.route} {self.status} {self.model!r} @{self.second}"
            f" x{len(self.seconds)}>"
        )

    @property
    def count(self) -> int:
        return len(self.seconds)

    def total(self) -> float:
        """The seconds of all of them (summed in order, as one observation after another)."""
        return sum(self.seconds)

    def total_ns(self) -> int:
        """Their nanoseconds, each request's truncated as a per-request counter would."""
        return sum([int(s * 1e9) for s in self.seconds])

    def histogram(self, bounds: Sequence[float]) -> Counter[int]:
        """``{bucket index: requests}`` over ``bounds`` (index i: the first bound >= seconds;
        ``len(bounds)``: above them all), like a histogram's ``observe`` one at a time."""
        return Counter(map(partial(bisect_left, bounds), self.seconds))


class RequestDigest:
    """What one flush delivers: its requests grouped (see :class:`RequestGroup`)."""

    __slots__ = ("count", "groups")

    def __init__(self, groups: Sequence[RequestGroup]) -> None:
        self.groups = groups
        self.count = sum(len(g.seconds) for g in groups)

    def __repr__(self) -> str:
        return f"<RequestDigest {self.count} requests in {len(self.groups)} groups>"

    @classmethod
    def of(cls, records: Iterable[RequestRecord]) -> RequestDigest:
        """Group ``records`` (in their order)."""
        groups: dict[tuple[str, int, ServedVersion | None, int], RequestGroup] = {}
        get = groups.get
        for route, status, seconds, model, at in records:
            second = int(at)
            key = (route, status, model, second)
            group = get(key)
            if group is None:
                group = groups[key] = RequestGroup(route, status, model, second, at)
            elif at > group.last_at:
                group.last_at = at
            group.seconds.append(seconds)
        return cls(list(groups.values()))

    def by_model(self) -> dict[ServedVersion | None, RequestDigest]:
        """The same requests split by the model version they ran on."""
        split: dict[ServedVersion | None, list[RequestGroup]] = {}
        for group in self.groups:
            split.setdefault(group.model, []).append(group)
        return {model: RequestDigest(groups) for model, groups in split.items()}


class Observer(Protocol):
    """A consumer of request and batch events (live series, Prometheus, Triton statistics)."""

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        """One inference request was answered: its route label, status, seconds taken and
        the model version it ran on (None when it was refused before one was resolved)."""

    def on_batch(self, event: BatchEvent) -> None:
        """The model's pipe ran one batch (called in the pipe's worker: keep it quick)."""


class BulkObserver(Observer, Protocol):
    """An observer that hears requests in bulk, at each flush, instead of one at a time."""

    def on_requests(self, digest: RequestDigest) -> None:
        """The requests answered since the last flush (called by one flush at a time)."""


T = TypeVar("T")


class Deferred(Generic[T]):
    """Items appended from any thread without a lock, delivered in bulk by one drain at a time.

    ``append`` is a deque's (atomic under the GIL). :meth:`drain` takes exactly the items
    present when it starts (only a drain removes items, so none is lost or delivered twice)
    and hands them over under its one lock, so drains never interleave.
    """

    __slots__ = ("_items", "_lock", "append")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self.append = self._items.append

    def __len__(self) -> int:
        return len(self._items)

    def drain(self, deliver: Callable[[list[T]], object], *, wait: bool = True) -> int:
        """Hand the items present now to ``deliver``; the number delivered.

        :param wait: wait for a drain under way (a reader: its read then sees everything
            appended before it), else leave the work to that drain and return 0.
        """
        lock = self._lock
        if not lock.acquire(blocking=wait):
            return 0
        try:
            items = self._items
            n = len(items)
            if not n:
                return 0
            pop = items.popleft
            deliver([pop() for _ in range(n)])
            return n
        finally:
            lock.release()


class Observers:
    """The observers of one served model.

    :param pipe: the model's pipe, if it has one (each observer becomes its listener).
    :param bound: buffered records at which the request adding the last one flushes.
    """

    def __init__(self, pipe: ModelPipe | None = None, *, bound: int = DEFAULT_BOUND) -> None:
        self._pipe = pipe
        self.bound = bound
        self._observers: list[Observer] = []
        # the old interface: called per request, at once
        self._calls: tuple[tuple[Observer, Callable[..., None], bool], ...] = ()
        # the bulk interface: called per flush
        self._bulk: tuple[tuple[Observer, Callable[[RequestDigest], None]], ...] = ()
        self._records: Deferred[RequestRecord] = Deferred()

    def attach(self, observer: Observer) -> None:
        """Tell ``observer`` about every request and every batch from now on.

        An observer with ``on_requests`` (a :class:`BulkObserver`) hears requests at each
        flush; one with only ``on_request`` is called once per request. One whose
        ``on_request`` takes only ``(route, status, seconds)`` (written before servers had
        several models) is called without the model.
        """
        self._observers.append(observer)
        bulk = getattr(observer, "on_requests", None)
        if callable(bulk):
            self._bulk = (*self._bulk, (observer, bulk))
        else:
            call = observer.on_request
            self._calls = (*self._calls, (observer, call, _takes_model(call)))
        if self._pipe is not None:
            self._pipe.add_listener(observer.on_batch)

    def __iter__(self) -> Iterator[Observer]:
        return iter(list(self._observers))

    @property
    def pending(self) -> int:
        """Requests recorded and not yet delivered to the bulk observers."""
        return len(self._records)

    def on_request(
        self, route: str, status: int, seconds: float, model: ServedVersion | None = None
    ) -> None:
        """Record one answered request (no lock; see the module docstring)."""
        if self._bulk:
            records = self._records
            records.append((route, status, seconds, model, _time()))
            if len(records) >= self.bound:
                self.flush(wait=False)
        if self._calls:
            self._call_each(route, status, seconds, model)

    def _call_each(
        self, route: str, status: int, seconds: float, model: ServedVersion | None
    ) -> None:
        for observer, call, with_model in self._calls:
            try:
                if with_model:
                    call(route, status, seconds, model)
                else:
                    call(route, status, seconds)
            except Exception:  # an observer must never break a request
                logger.exception("request observer %r failed", observer)

    def flush(self, *, wait: bool = True) -> int:
        """Deliver the recorded requests to the bulk observers; the number delivered.

        One flush at a time: with ``wait`` (a reader), wait for a flush under way and then
        deliver the rest, so the caller's read counts every request answered before it;
        without (the bound, a batch listener), leave it to the flush under way.
        """
        return self._records.drain(self._deliver, wait=wait)

    def _deliver(self, records: list[RequestRecord]) -> None:
        digest = RequestDigest.of(records)
        for observer, on_requests in self._bulk:
            try:
                on_requests(digest)
            except Exception:  # an observer must never break a flush
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
