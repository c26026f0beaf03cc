"""Gathering items into batches, and the default way to stack and unstack them.

No threads are started here and nothing here knows about futures or stages: a
:class:`Batcher` is a bounded queue with a batching policy, and :func:`collate` /
:func:`split_rows` turn a list of items into one function input and the function's output back
into one result per item. :class:`~studioserve.pipelines.ModelPipe` wires these to worker
threads.

Choosing a batching policy
--------------------------

*Fixed* (the default: ``max_batch_size=N, max_delay=0``)
    A worker takes what is queued when it becomes free, up to ``N`` rows. Under light load
    every item runs alone and at once (no added latency, as Triton's dynamic batcher with no
    queue delay); under load the queue fills while the model computes, so batches grow by
    themselves. Use it when a batch of ``N`` rows computes within your latency budget: it is
    the simplest and the most predictable. ``max_delay > 0`` trades latency for larger batches
    at moderate load (a worker waits up to that long after the oldest item);
    ``preferred_batch_sizes`` cuts batches at sizes the model runs best at.

    One refinement, ``linger`` (default 1/4): a worker whose stage is *busy* (its last batch
    had several items, or several are queued) keeps collecting items that are still arriving
    before it calls the model, for at most ``linger`` times the measured compute time of a
    batch, and stops as soon as a quarter of that passes without an arrival. Clients that
    resubmit as soon as their result comes back then share one call instead of splitting into
    two half-full ones that each pay the model's fixed per-call cost. An idle stage never
    lingers, so light-load latency is untouched; ``linger=0`` turns it off.

*Adaptive* (``adaptive=True, latency_objective=S``)
    The batch-size limit is steered by measured compute time, as Clipper does: additive
    increase while a full batch computes within ``S`` seconds, multiplicative decrease (to 3/4)
    when one takes longer. Use it when you have a per-batch latency objective but do not know
    (or cannot fix) how large a batch the hardware runs within it: another machine, a GPU
    shared with other work, load from other processes. The limit only grows on batches that
    were full, so it does not creep up while demand is low; ``max_batch_size`` caps it.

Rows
----
Batch sizes count *rows*: a numpy array item of shape ``(n, ...)`` (or a dict / tuple / list of
such arrays) counts ``n``; any other item counts 1. A worker takes items while their rows fit
in the limit, and always at least one item, so an item larger than the limit runs alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import PipeClosed

__all__ = [
    "AIMDController",
    "Batcher",
    "Collated",
    "collate",
    "row_count",
    "split_rows",
]

T = TypeVar("T")

_monotonic = time.monotonic


class AIMDController:
    """Additive-increase / multiplicative-decrease batch-size limit (Clipper's policy).

    :param max_batch_size: the largest limit it may reach.
    :param latency_objective: seconds a batch may take to compute.
    :param start: the initial limit (default: a quarter of ``max_batch_size``, at least 1).
    :param step: rows added after a full batch that met the objective.
    :param backoff: factor applied to the limit after a batch that missed the objective.

    >>> c = AIMDController(max_batch_size=64, latency_objective=0.01, start=8)
    >>> c.record(rows=8, seconds=0.005); c.limit
    9
    >>> c.record(rows=9, seconds=0.02); c.limit
    6
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        latency_objective: float,
        start: int | None = None,
        step: int = 1,
        backoff: float = 0.75,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, not {max_batch_size!r}")
        if not latency_objective > 0:
            raise ValueError(f"latency_objective must be > 0 seconds, not {latency_objective!r}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be between 0 and 1, not {backoff!r}")
        self.max_batch_size = max_batch_size
        self.latency_objective = float(latency_objective)
        self.step = max(1, int(step))
        self.backoff = backoff
        initial = start if start is not None else max(1, max_batch_size // 4)
        self.limit = min(max(1, int(initial)), max_batch_size)

    def record(self, rows: int, seconds: float) -> int:
        """Feed one batch's measurement; returns the new limit.

        :param rows: the rows the batch had.
        :param seconds: how long the batch took to compute.
        """
        limit = self.limit
        if seconds > self.latency_objective:
            limit = max(1, min(limit, int(limit * self.backoff)))
        elif rows >= limit:
            limit = min(self.max_batch_size, limit + self.step)
        self.limit = limit
        return limit


class Batcher(Generic[T]):
    """A bounded FIFO that hands out batches: the batching policy of one pipe stage.

    Producers :meth:`put` items with their row counts; consumers call :meth:`get_batch`, which
    blocks until at least one item is queued and returns up to the current limit of rows.

    How long a consumer waits for more items once one is queued: up to ``max_delay`` after the
    oldest queued item (0: not at all), and, only while the stage is busy, up to ``linger``
    times a batch's measured compute time for items still arriving (see the module docstring).

    :param max_batch_size: most rows per batch (1 = no batching).
    :param max_delay: seconds a consumer may wait after the oldest queued item for more items.
    :param preferred_batch_sizes: when given, a batch is cut to the largest preferred size that
        fits what is queued (if any fits), and waiting with ``max_delay`` ends early once the
        largest preferred size is queued.
    :param maxsize: most items queued; :meth:`put` refuses more.
    :param adaptive: steer the limit with an :class:`AIMDController` fed by :meth:`record`.
    :param latency_objective: seconds, required with ``adaptive``.
    :param linger: fraction of a batch's compute time a busy consumer may wait for arrivals.
    :raises ValueError: for an invalid setting.

    >>> b = Batcher(max_batch_size=3)
    >>> for i in range(5):
    ...     _ = b.put(i)
    >>> b.get_batch(), b.get_batch()
    ([0, 1, 2], [3, 4])
    """

    #: below this many seconds a linger window is not worth a wait
    MIN_LINGER = 50e-6

    def __init__(
        self,
        *,
        max_batch_size: int = 1,
        max_delay: float = 0.0,
        preferred_batch_sizes: Sequence[int] | None = None,
        maxsize: int = 1024,
        adaptive: bool = False,
        latency_objective: float | None = None,
        linger: float = 0.25,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, not {max_batch_size!r}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0 seconds, not {max_delay!r}")
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, not {maxsize!r}")
        if not 0 <= linger <= 1:
            raise ValueError(f"linger must be a fraction between 0 and 1, not {linger!r}")
        preferred = sorted({int(p) for p in preferred_batch_sizes or ()})
        if preferred and (preferred[0] < 1 or preferred[-1] > max_batch_size):
            raise ValueError(
                f"preferred_batch_sizes must lie in 1..max_batch_size ({max_batch_size}), "
                f"not {list(preferred_batch_sizes or ())!r}"
            )
        self.max_batch_size = max_batch_size
        self.max_delay = float(max_delay)
        self.preferred_batch_sizes: tuple[int, ...] = tuple(preferred)
        self.maxsize = maxsize
        self.linger = float(linger) if max_batch_size > 1 else 0.0
        self.controller: AIMDController | None = None
        if adaptive:
            if latency_objective is None:
                raise ValueError("adaptive batching needs latency_objective (seconds per batch)")
            self.controller = AIMDController(
                max_batch_size=max_batch_size, latency_objective=latency_objective
            )
        self._lock = threading.Lock()
        # consumers waiting for a first item / for a batch to fill up / producers for room
        self._not_empty = threading.Condition(self._lock)
        self._filling = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        # (item, rows, enqueue time)
        self._q: deque[tuple[T, int, float]] = deque()
        self._rows = 0
        self._idle = 0  # consumers waiting on _not_empty
        self._fillers = 0  # consumers waiting on _filling
        self._fill_target = 0  # rows at which to wake them
        self._putters = 0
        self._closed = False
        self._last_size = 0  # items in the last batch handed out
        #: moving average of a batch's compute seconds (fed by :meth:`record`)
        self.compute_ema = 0.0
        #: items ever accepted by :meth:`put` / :meth:`put_wait` (read without the lock).
        self.accepted = 0

    # -- introspection -------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """The current batch-size limit in rows (moves in adaptive mode)."""
        c = self.controller
        return c.limit if c is not None else self.max_batch_size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __len__(self) -> int:
        return len(self._q)

    @property
    def queued_rows(self) -> int:
        """Rows queued now (read without the lock: a snapshot, exact between operations)."""
        return self._rows

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest queued item has waited at ``now`` (0 when the queue is empty).

        Read without the lock, so it costs no contention with the workers.
        """
        try:
            return max(0.0, now - self._q[0][2])
        except IndexError:  # empty, or emptied while we looked
            return 0.0

    # -- producers -----------------------------------------------------------------------------
    def _append(self, item: T, rows: int) -> None:
        # the lock is held
        self._q.append((item, rows, _monotonic()))
        self._rows += rows
        self.accepted += 1
        if self._idle:
            self._not_empty.notify()
        if self._fillers and self._rows >= self._fill_target:
            self._filling.notify_all()

    def put(self, item: T, rows: int = 1) -> bool:
        """Queue ``item`` without blocking.

        :returns: False when the queue is full.
        :raises PipeClosed: after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise PipeClosed("this pipe stage is closed; it accepts no more items")
            if len(self._q) >= self.maxsize:
                return False
            self._append(item, rows)
        return True

    def put_wait(self, item: T, rows: int = 1, timeout: float | None = None) -> bool:
        """Queue ``item``, waiting while the queue is full.

        :returns: False when ``timeout`` passed first.
        :raises PipeClosed: after :meth:`close` or :meth:`abort`.
        """
        end = None if timeout is None else _monotonic() + timeout
        with self._lock:
            while len(self._q) >= self.maxsize and not self._closed:
                remaining = None if end is None else end - _monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._putters += 1
                try:
                    self._not_full.wait(remaining)
                finally:
                    self._putters -= 1
            if self._closed:
                raise PipeClosed("this pipe stage is closed; it accepts no more items")
            self._append(item, rows)
        return True

    # -- consumers -----------------------------------------------------------------------------
    def get_batch(self, timeout: float | None = None) -> list[T] | None:
        """Wait for items and return the next batch (a non-empty list).

        :param timeout: seconds to wait for the first item; ``[]`` when they pass.
        :returns: ``None`` once the batcher is closed and drained.
        """
        entries = self.get_batch_entries(timeout)
        if entries is None:
            return None
        return [e[0] for e in entries]

    def _wait_filled(self, target: int, timeout: float) -> None:
        # the lock is held; wait until `target` rows are queued or `timeout` passes
        self._fillers += 1
        if self._fillers == 1 or target < self._fill_target:
            self._fill_target = target
        try:
            self._filling.wait(timeout)
        finally:
            self._fillers -= 1

    def _gather(self, target: int) -> None:
        # the lock is held and items are queued: wait for more as max_delay and linger allow
        q = self._q
        if self._rows >= target or self._closed:
            return
        if self.max_delay > 0:
            end = q[0][2] + self.max_delay
            while q and self._rows < target and not self._closed:
                remaining = end - _monotonic()
                if remaining <= 0:
                    break
                self._wait_filled(target, remaining)
        window = self.linger * self.compute_ema
        if (
            window >= self.MIN_LINGER
            and self._rows < target
            and (self._last_size > 1 or len(q) > 1)
            and not self._closed
        ):
            # busy: collect items still arriving (see the module docstring)
            slice_ = window / 4
            end = _monotonic() + window
            while q and self._rows < target and not self._closed:
                remaining = end - _monotonic()
                if remaining <= 0:
                    break
                seen = self.accepted
                self._wait_filled(target, min(slice_, remaining))
                if self.accepted == seen:
                    break

    def get_batch_entries(self, timeout: float | None = None) -> list[tuple[T, int, float]] | None:
        """Like :meth:`get_batch`, as ``(item, rows, enqueue time)`` entries."""
        with self._lock:
            q = self._q
            end = None if timeout is None else _monotonic() + timeout
            while True:
                while not q:
                    if self._closed:
                        return None
                    remaining = None if end is None else end - _monotonic()
                    if remaining is not None and remaining <= 0:
                        return []
                    self._idle += 1
                    try:
                        self._not_empty.wait(remaining)
                    finally:
                        self._idle -= 1
                limit = self.limit
                preferred = self.preferred_batch_sizes
                self._gather(min(limit, preferred[-1]) if preferred else limit)
                if q:
                    break
                # another consumer took everything while this one waited: start over
            if preferred:
                avail = min(self._rows, limit)
                fits = [p for p in preferred if p <= avail]
                if fits:
                    limit = fits[-1]
            first = q.popleft()
            batch = [first]
            taken = first[1]
            while q and taken + q[0][1] <= limit:
                entry = q.popleft()
                taken += entry[1]
                batch.append(entry)
            self._rows -= taken
            self._last_size = len(batch)
            if self._putters:
                self._not_full.notify(len(batch))
            return batch

    # -- lifecycle -----------------------------------------------------------------------------
    def record(self, rows: int, seconds: float) -> None:
        """Feed one batch's compute time: the linger window and the adaptive controller use it."""
        ema = self.compute_ema
        self.compute_ema = seconds if ema == 0.0 else 0.8 * ema + 0.2 * seconds
        c = self.controller
        if c is not None:
            with self._lock:
                c.record(rows, seconds)

    def close(self) -> None:
        """Refuse new items; consumers drain what is queued, then get ``None``."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._filling.notify_all()
            self._not_full.notify_all()

    def abort(self) -> list[T]:
        """Close and remove everything still queued; returns those items."""
        with self._lock:
            self._closed = True
            items = [e[0] for e in self._q]
            self._q.clear()
            self._rows = 0
            self._not_empty.notify_all()
            self._filling.notify_all()
            self._not_full.notify_all()
        return items


# -- stacking and unstacking ----------------------------------------------------------------------


def row_count(value: Any) -> int:
    """Rows an item contributes to a batch: ``len`` of an array's first axis, else 1.

    Dicts, tuples and lists of arrays count the rows of their first entry.
    """
    if isinstance(value, np.ndarray):
        return value.shape[0] if value.ndim else 1
    if isinstance(value, Mapping):
        for v in value.values():
            return v.shape[0] if isinstance(v, np.ndarray) and v.ndim else 1
        return 1
    if isinstance(value, (tuple, list)) and value:
        v = value[0]
        if isinstance(v, np.ndarray) and v.ndim and all(isinstance(x, np.ndarray) for x in value):
            return int(v.shape[0])
    return 1


class Collated:
    """One group of items stacked into a single function input.

    :ivar indices: positions (in the list given to :func:`collate`) of the group's items.
    :ivar data: the function input (a stacked array, dict, tuple/list, or a list of items).
    :ivar rows: each item's row count, or ``None`` for a list of items (one output per item).
    """

    __slots__ = ("data", "indices", "rows")

    def __init__(self, indices: list[int], data: Any, rows: list[int] | None) -> None:
        self.indices = indices
        self.data = data
        self.rows = rows


def _signature(v: Any) -> tuple[Any, ...]:
    if isinstance(v, np.ndarray):
        if v.ndim:
            return ("a", v.shape[1:], v.dtype)
        return ("o",)
    parts: list[tuple[Any, ...]] = []
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(x, np.ndarray) or not x.ndim:
                return ("o",)
            parts.append((k, x.shape[1:], x.dtype))
        return ("d", tuple(parts)) if parts else ("o",)
    if isinstance(v, (tuple, list)) and v:
        for x in v:
            if not isinstance(x, np.ndarray) or not x.ndim:
                return ("o",)
            parts.append((x.shape[1:], x.dtype))
        return ("t", type(v), tuple(parts))
    return ("o",)


def _stack(kind: str, values: list[Any]) -> Any:
    if len(values) == 1:
        return values[0]
    if kind == "a":
        return np.concatenate(values, axis=0)
    if kind == "d":
        return {k: np.concatenate([v[k] for v in values], axis=0) for k in values[0]}
    # tuple / list of arrays: concatenate entry by entry, keep the container type
    n = len(values[0])
    stacked = [np.concatenate([v[i] for v in values], axis=0) for i in range(n)]
    return tuple(stacked) if isinstance(values[0], tuple) else stacked


def collate(values: Sequence[Any]) -> list[Collated]:
    """Stack items for one batched call (the default batcher).

    Numpy arrays (``ndim >= 1``) are concatenated along axis 0; dicts and tuples/lists of arrays
    entry by entry. Items whose trailing shapes or dtypes differ go into separate groups, so one
    odd item never breaks the others' batch. Any other items form one group whose data is the
    list of items (Studio.ML's convention: the function gets a list, returns one output each).

    :returns: one :class:`Collated` per group, usually exactly one.
    """
    n = len(values)
    if n == 0:
        return []
    v0 = values[0]
    if type(v0) is np.ndarray and v0.ndim:
        # the common case, kept quick: arrays of one trailing shape and dtype
        tail, dt, nd = v0.shape[1:], v0.dtype, v0.ndim
        for v in values:
            if not (
                type(v) is np.ndarray and v.ndim == nd and v.shape[1:] == tail and v.dtype == dt
            ):
                break
        else:
            rows = [v.shape[0] for v in values]
            data = v0 if n == 1 else np.concatenate(values, axis=0)
            return [Collated(list(range(n)), data, rows)]
    first = _signature(v0)
    groups: dict[tuple[Any, ...], list[int]] | None = None
    for i in range(1, n):
        sig = _signature(values[i])
        if sig != first:
            groups = {}
            for j in range(n):
                groups.setdefault(_signature(values[j]) if j != i else sig, []).append(j)
            break
    if groups is None:
        groups = {first: list(range(n))}
    out = []
    for sig, idx in groups.items():
        kind = sig[0]
        members = [values[i] for i in idx]
        if kind == "o":
            out.append(Collated(idx, members, None))
        else:
            out.append(Collated(idx, _stack(kind, members), [row_count(v) for v in members]))
    return out


def _length(output: Any) -> int | None:
    if isinstance(output, np.ndarray):
        return int(output.shape[0]) if output.ndim else None
    try:
        return len(output)
    except TypeError:
        return None


def split_rows(output: Any, rows: Sequence[int]) -> list[Any]:
    """Split a batched output back into one result per item, by row counts.

    Arrays (and sequences) are sliced along axis 0; a dict, tuple or list of arrays is split
    entry by entry (multi-output models), giving each item the same container of slices.

    :raises BatchRowsError: when the output does not have ``sum(rows)`` rows.
    """
    total = sum(rows)
    if isinstance(output, (dict, tuple, list)) and output and _is_multi(output, total):
        if isinstance(output, dict):
            keys = list(output)
            parts = [split_rows(output[k], rows) for k in keys]
            return [dict(zip(keys, vals, strict=True)) for vals in zip(*parts, strict=True)]
        parts = [split_rows(o, rows) for o in output]
        ctor: Callable[[Any], Any] = tuple if isinstance(output, tuple) else list
        return [ctor(vals) for vals in zip(*parts, strict=True)]
    got = _length(output)
    if got != total:
        raise BatchRowsError(got, total)
    if total == len(rows):  # one row each
        return [output[i : i + 1] for i in range(total)]
    res = []
    start = 0
    for r in rows:
        end = start + r
        res.append(output[start:end])
        start = end
    return res


def _is_multi(output: dict[Any, Any] | tuple[Any, ...] | list[Any], total: int) -> bool:
    """A container of arrays with ``total`` rows each (multi-output), not a per-row list."""
    if isinstance(output, dict):
        return True
    return all(isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == total for v in output)


def split_items(output: Any, n: int) -> list[Any]:
    """One output per item: ``output[i]`` for a sequence of length ``n``.

    :raises BatchRowsError: when the output's length is not ``n``.
    """
    got = _length(output)
    if got != n:
        raise BatchRowsError(got, n)
    if isinstance(output, list):
        return output
    return [output[i] for i in range(n)]


class BatchRowsError(Exception):
    """Internal: a batched output with the wrong number of rows."""

    def __init__(self, got: int | None, expected: int) -> None:
        super().__init__(got, expected)
        self.got = got
        self.expected = expected
