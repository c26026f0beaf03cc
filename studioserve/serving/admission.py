"""Admission control: shed load early, with 503 + Retry-After, instead of queueing it unseen.

The HTTP server runs a fixed pool of blocking threads (``--threads``) and every inference
request holds one while it waits for its items. Requests beyond the pool wait inside the HTTP
server (granian's backpressure queue, the kernel's listen backlog), where Python cannot see
them, so without a limit an overloaded server answers every request late (up to the request
timeout) and none early. :class:`AdmissionController` is asked by
:class:`~studioserve.serving.inference.RequestHandler` after the ready check and the size
limit, before the body is read or decoded, and refuses (raises
:class:`~studioserve.errors.Saturated`) when the server is saturated:

1. ``max_in_flight`` inference requests are already admitted (a cap below the thread pool,
   :func:`default_max_in_flight`: the threads left over stay free to answer refusals, probes
   and the status page at once, so the HTTP server's queue drains fast, as 503s), or the
   declared bytes of the bodies admitted would pass ``max_body_bytes`` (the runtime sets it
   to the cap times ``--max-body``: on an event loop no thread pool bounds how many bodies
   are held at once; a request alone is always admitted on this count);
2. the pipe's first queue is full (submit would raise :class:`~studioserve.errors.Overloaded`);
3. the whole batches ahead of a new item would keep it waiting longer than
   ``max_queue_time`` (:meth:`AdmissionController.expected_wait`: the rows queued in the
   pipe, or the requests admitted and not yet answered, over the rows the slowest stage
   computes per round, times its measured compute time per batch); an item that fits in the
   next round is always admitted, so a model whose single batch takes longer than
   ``max_queue_time`` still runs full batches; until the first batch is measured, two rounds
   of requests are admitted (a flood on a fresh server would otherwise all be let in);
4. the oldest queued item has already waited longer than ``max_queue_time`` plus one batch
   time (the estimate is off: the model slowed down or is stuck in one call).

A refusal costs a lock and a few reads (microseconds) and frees the thread at once; it is
answered through the protocol's error table like any error (503, ``Retry-After`` in whole
seconds, at least 1, from the queued work), counted here (:attr:`refused`) and by the
observers (status 503), and never touches :class:`~studioserve.serving.activity.Activity`
(the inactivity timer does not count refused requests). Models without a pipe (callable,
identity) have only the cap. Under a light load nothing here refuses: the cap is not reached
and every queue fits in its next batch.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ..errors import Saturated
from ..pipelines import ModelPipe, PipeLoad

__all__ = [
    "AdmissionController",
    "default_max_in_flight",
    "default_max_queue_time",
]


class _Default:
    """The type of :data:`_DEFAULT` (the controller's own pipe)."""


_DEFAULT = _Default()

#: the longest Retry-After we suggest, in seconds
MAX_RETRY_AFTER = 30.0


def default_max_queue_time(request_timeout: float) -> float:
    """The default bounded queue time: a quarter of the request timeout, at most 1 second."""
    return min(1.0, request_timeout / 4)


def default_max_in_flight(threads: int) -> int:
    """The default cap on admitted inference requests for ``threads`` HTTP threads.

    The threads minus a reserve of an eighth (at least 1, none with a single thread): 28 of
    the default 32. The reserve answers refusals, probes and the status page while every
    admitted request waits for the model.
    """
    if threads <= 1:
        return 1
    return threads - max(1, threads // 8)


class AdmissionController:
    """Decides, per inference request and before it is decoded, whether to serve it now.

    One controller is shared by every protocol's :class:`RequestHandler` of a server, so the
    cap counts pickle and OIP requests together.

    :param pipe: the default pipe of :meth:`admit` (a server of several models passes each
        request's own; None, for models without one: only the cap applies).
    :param max_queue_time: seconds of queued work a new request may find ahead of it.
    :param max_in_flight: the most inference requests admitted at once (None: no cap).
    :raises ValueError: for a non-positive ``max_queue_time`` or ``max_in_flight``.

    ``max_queue_time`` and ``max_in_flight`` are plain attributes: setting them takes effect
    for the next request.
    """

    def __init__(
        self,
        pipe: ModelPipe | None = None,
        *,
        max_queue_time: float,
        max_in_flight: int | None = None,
    ) -> None:
        if not max_queue_time > 0:
            raise ValueError(f"max_queue_time must be > 0 seconds, not {max_queue_time!r}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (or None), not {max_in_flight!r}")
        self.pipe = pipe
        self.max_queue_time = float(max_queue_time)
        self.max_in_flight = max_in_flight
        #: whether every admitted request holds an HTTP thread until it is answered (a WSGI
        #: server); False on an event loop, where only a request to a model without a pipe
        #: does (its call runs in the executor), so the cap binds only those: a pipe's
        #: requests wait in its queue, where the queue-time rule sees them
        self.threads_per_request = True
        #: the most request-body bytes admitted at once (declared lengths; None: no bound).
        #: On an event loop no thread pool bounds how many bodies are read at a time, so the
        #: runtime sets it to what the thread cap allowed: the cap times ``--max-body``
        self.max_body_bytes: int | None = None
        self._body_bytes = 0
        self._lock = threading.Lock()
        self._in_flight = 0
        self._per_pipe: dict[int, int] = {}  # id(pipe) -> admitted requests on that model
        #: requests admitted since the start
        self.admitted = 0
        #: requests refused since the start
        self.refused = 0
        #: refusals by reason (``in_flight``, ``queue_full``, ``queue_time``)
        self.refused_by: dict[str, int] = {"in_flight": 0, "queue_full": 0, "queue_time": 0}

    @property
    def in_flight(self) -> int:
        """Inference requests admitted and not yet released."""
        return self._in_flight

    def admit(self, pipe: ModelPipe | None | _Default = _DEFAULT, nbytes: int = 0) -> None:
        """Take a slot for one request; :meth:`release` it once the request is answered.

        :param pipe: the pipe of the model the request runs on (default: the controller's
            own): with several models served, the in-flight cap is the server's and the
            queue verdict is each model's.
        :param nbytes: the request's declared body length, counted against
            :attr:`max_body_bytes` (a request is always admitted on this count when no other
            body is in flight).
        :raises Saturated: when the server is saturated (see the module docstring); no slot
            is taken then.
        """
        if isinstance(pipe, _Default):
            pipe = self.pipe
        load = pipe.load() if pipe is not None else None
        cap = self.max_in_flight
        wait = 0.0
        key = id(pipe)
        with self._lock:  # decide and count at once: concurrent requests see each other
            in_flight = self._in_flight
            held = self._body_bytes
            most = self.max_body_bytes
            if cap is not None and in_flight >= cap and self._cap_binds(load, cap):
                reason: str | None = "in_flight"
            elif most is not None and held and held + nbytes > most:
                reason = "body_bytes"
            elif load is None:
                reason = None
            else:
                mine = self._per_pipe.get(key, 0)
                wait = self.expected_wait(load, mine)
                reason = self._queue_verdict(load, wait)
            if reason is None:
                self._in_flight = in_flight + 1
                self._body_bytes = held + nbytes
                self._per_pipe[key] = self._per_pipe.get(key, 0) + 1
                self.admitted += 1
                return
            self.refused += 1
            # the body bytes are an in-flight bound too: counted with the cap's refusals
            self.refused_by["in_flight" if reason == "body_bytes" else reason] += 1
        raise self._refusal(reason, load, wait, in_flight)

    def _cap_binds(self, load: PipeLoad | None, cap: int) -> bool:
        """Whether the in-flight cap refuses now: only when the model is slow for the bound.

        With every admitted slot taken, new requests wait for a thread in the HTTP server's
        own queue, unseen here, for about the time the model takes to turn the slots over
        (``cap`` rows at its measured rate). A model that turns them over in a small part of
        the queue bound (most models: a batch of many rows in milliseconds) keeps that wait
        short, so its requests are served, not shed, however many clients keep connections
        open; a slow one, one not yet measured, or one whose rate is unknown (no pipe, or no
        batching stage) is capped, so the backlog drains as 503s.
        """
        if load is None or load.round_rows < 1:
            return True
        if not self.threads_per_request:
            return False
        if load.batch_seconds <= 0:
            return True
        turnover = cap * load.batch_seconds / load.round_rows
        return turnover > self.max_queue_time / 16

    def alone(self, pipe: ModelPipe | None | _Default = _DEFAULT) -> bool:
        """Whether at most one request (the caller's) is admitted for ``pipe`` now."""
        key = id(self.pipe if isinstance(pipe, _Default) else pipe)
        return self._per_pipe.get(key, 0) <= 1

    def release(self, pipe: ModelPipe | None | _Default = _DEFAULT, nbytes: int = 0) -> None:
        """Give back the slot :meth:`admit` took (for the same ``pipe`` and ``nbytes``)."""
        key = id(self.pipe if isinstance(pipe, _Default) else pipe)
        with self._lock:
            self._in_flight -= 1
            self._body_bytes -= nbytes
            left = self._per_pipe.get(key, 0) - 1
            if left > 0:
                self._per_pipe[key] = left
            else:
                self._per_pipe.pop(key, None)

    @staticmethod
    def expected_wait(load: PipeLoad, in_flight: int) -> float:
        """Seconds a new request would wait for the batches ahead of it.

        The larger of the pipe's own estimate (the rows queued in its stages) and the one from
        the requests admitted and not yet answered: those may not have reached the queue yet
        (still being read or decoded), and a burst must not all be admitted on one look at
        the queue. Each request counts as one row there; the running round is not ahead.
        Before the first batch is measured the batch time is unknown: two rounds of requests
        (the running one and the next) are admitted, more read as infinitely long.
        """
        per_round = load.round_rows
        if per_round < 1:  # no stage: the pipe's functions run in the request's thread
            return load.expected_wait
        ahead = max(0, in_flight - per_round) // per_round
        if not ahead:
            return load.expected_wait
        if load.batch_seconds <= 0:
            return math.inf
        return max(load.expected_wait, ahead * load.batch_seconds)

    def _queue_verdict(self, load: PipeLoad, wait: float) -> str | None:
        if load.full:
            return "queue_full"
        bound = self.max_queue_time
        if wait > bound or load.oldest_wait > bound + load.batch_seconds:
            return "queue_time"
        return None

    def _refusal(
        self, reason: str, load: PipeLoad | None, wait: float, in_flight: int
    ) -> Saturated:
        backlog = 0.0
        if load is not None:
            backlog = max(load.expected_wait, load.oldest_wait) + load.batch_seconds
            if math.isfinite(wait):
                backlog = max(backlog, wait + load.batch_seconds)
        retry = min(MAX_RETRY_AFTER, max(1.0, float(math.ceil(backlog))))
        if reason == "body_bytes":
            what = (
                f"{self._body_bytes} bytes of request bodies are in flight, the most it holds "
                f"at once ({self.max_body_bytes})"
            )
            reason = "in_flight"
        elif reason == "in_flight":
            what = (
                f"{in_flight} inference requests are in flight, the most it admits at once "
                "(the HTTP threads minus a reserve)"
            )
        elif reason == "queue_full":
            what = "the model's input queue is full"
        elif math.isinf(wait):
            what = (
                f"{in_flight} inference requests are in flight before the model's first batch "
                "has finished (its batch time is not measured yet)"
            )
        else:
            assert load is not None
            what = (
                f"about {max(wait, load.oldest_wait):.2f} s of work is queued ahead of a new "
                f"request, over the bounded queue time of {self.max_queue_time:.2f} s"
            )
        return Saturated(
            f"the server is saturated: {what}; retry after {retry:g} s",
            reason=reason,
            retry_after=retry,
        )

    def snapshot(self) -> dict[str, Any]:
        """The limits and counters, for the status page and tests (JSON-ready)."""
        with self._lock:
            return {
                "max_in_flight": self.max_in_flight,
                "max_queue_ms": round(self.max_queue_time * 1000, 3),
                "in_flight": self._in_flight,
                "admitted": self.admitted,
                "refused": self.refused,
                "refused_by": dict(self.refused_by),
            }
