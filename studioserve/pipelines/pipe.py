"""ModelPipe: Studio.ML's pipeline API as a long-lived service that batches across requests.

A pipe is a chain of functions. Each :meth:`ModelPipe.add` with an option (``num_workers``,
``batch_size``, ``filterf``, ...) starts a *stage*: a bounded queue (:class:`Batcher`) and
persistent worker threads. An ``add()`` without options composes with the function before it
(Studio.ML's rule), so it costs no queue and no thread: functions added before the first stage
run in the thread that submits, functions added after a stage run in that stage's workers,
per item. A Keras model given to ``add()`` becomes a batching stage of its own.

Two ways in:

* service mode: :meth:`ModelPipe.submit` returns a :class:`concurrent.futures.Future`; items
  submitted by many threads meet in a batching stage's queue and run in one call;
* Studio.ML's mode: ``pipe(data)`` / :meth:`~ModelPipe.apply_ordered` on a dict, list, set or
  generator, which streams the items through the same threads.

Where an item's work happens, for ``pipe.add(pre).add(model, batch_size=32).add(post)``::

    submitting thread: pre(item), checks for the model stage   -> queue (bounded)
    model worker:      model(stacked batch), split per item, post(row) -> future

A single-stage pipe hands each item over once (one queue, one thread hop each way).

Failures are per item: a stage that raises fails only the items it raised for (a batched call
that raises is re-run in halves, then singly, to find them), and the future carries an error
from :mod:`studioserve.errors` naming the item's key and the stage. See
:mod:`studioserve.pipelines.batching` for the batching policies and when to use which.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from numpy import ndarray

from ..errors import (
    BatchSizeMismatch,
    DeadlineExceeded,
    ItemFailed,
    ItemFiltered,
    Overloaded,
    PipeClosed,
    PipelineError,
)
from .batching import Batcher, BatchRowsError, Collated, collate, row_count, split_items, split_rows
from .keras_stage import KerasRunner, is_keras_model

logger = logging.getLogger(__name__)

__all__ = ["BatchEvent", "ModelPipe", "PipeStats", "StageStats"]

#: max_batch_size of a Keras model stage when add() is not given one
DEFAULT_KERAS_BATCH_SIZE = 64

_monotonic = time.monotonic
_perf = time.perf_counter


@dataclass(frozen=True)
class BatchEvent:
    """What a listener hears after every batch a stage ran (a non-batching stage: every item).

    :ivar stage: the stage's name.
    :ivar size: items in the batch.
    :ivar rows: rows in the batch (see :mod:`~studioserve.pipelines.batching`).
    :ivar queue_waits: seconds each item waited in the stage's queue.
    :ivar compute_seconds: seconds the stage's function took for the whole batch.
    :ivar ok: items that succeeded.
    :ivar failed: items that failed (raised, expired, wrong output rows).
    """

    stage: str
    size: int
    rows: int
    queue_waits: tuple[float, ...]
    compute_seconds: float
    ok: int
    failed: int


@dataclass(frozen=True)
class StageStats:
    """A snapshot of one stage's counters (totals since the pipe started).

    :ivar batch_sizes: histogram: rows per batch -> number of batches.
    :ivar batch_limit: the current limit in rows (moves in adaptive mode).
    """

    name: str
    workers: int
    batching: bool
    max_batch_size: int
    batch_limit: int
    items: int
    batches: int
    failures: int
    batch_sizes: dict[int, int]
    compute_seconds: float
    queue_wait_seconds: float
    queue_depth: int


@dataclass(frozen=True)
class PipeStats:
    """A snapshot of a pipe: per-stage counters (in pipe order) and the items in flight."""

    stages: dict[str, StageStats] = field(default_factory=dict)
    in_flight: int = 0
    accepted: int = 0


class _Item:
    """One submitted item on its way through the stages."""

    __slots__ = ("deadline", "future", "key", "value")

    def __init__(self, key: Any, value: Any, future: Future[Any], deadline: float | None) -> None:
        self.key = key
        self.value = value
        self.future = future
        self.deadline = deadline


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Counters:
    """One worker's counters; only that worker writes them, :meth:`ModelPipe.stats` sums."""

    __slots__ = ("batches", "compute", "done", "failures", "hist", "items", "wait")

    def __init__(self) -> None:
        self.items = 0
        self.batches = 0
        self.failures = 0
        self.done = 0
        self.compute = 0.0
        self.wait = 0.0
        self.hist: dict[int, int] = {}


Func = Callable[[Any], Any]


class _Stage:
    def __init__(
        self,
        *,
        name: str,
        func: Func,
        num_workers: int,
        batching: bool,
        queue: Batcher[_Item],
        filterf: Callable[[Any], Any] | None,
        batcher: Callable[[list[Any]], Any] | None,
        splitter: Callable[[Any, list[int]], Sequence[Any]] | None,
        timeout: float | None,
        prepare: Callable[[Any], tuple[Any, int]] | None,
    ) -> None:
        self.name = name
        self.func = func
        self.num_workers = num_workers
        self.batching = batching
        self.queue = queue
        self.filterf = filterf
        self.batcher = batcher
        self.splitter = splitter
        self.timeout = timeout
        self.prepare = prepare
        self.post: list[tuple[str, Func]] = []
        self.next: _Stage | None = None
        self.threads: list[threading.Thread] = []
        self.counters: list[_Counters] = []
        self.rejected = 0  # items failed on the way in (filter, input checks); under _lock
        self._lock = threading.Lock()

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1


def _func_name(func: Any) -> str:
    name = getattr(func, "name", None) if is_keras_model(func) else None
    name = name or getattr(func, "__name__", None) or type(func).__name__
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(name)).strip("_")
    return name or "stage"


class ModelPipe:
    """A chain of functions that runs items through worker threads, batching where asked.

    :param queue_size: most items waiting in each stage's queue; :meth:`submit` raises
        :class:`~studioserve.errors.Overloaded` when the first stage's queue is full.
    :param name: used in thread names (``studioserve-<name>-<stage>-<i>``) and logs.

    Example::

        with ModelPipe(name="mnist") as pipe:
            pipe.add(lambda x: x.astype("float32") / 255)    # runs in the submitting thread
            pipe.add(model, max_batch_size=64)                # batched across submitters
            pipe.add(lambda rows: rows.argmax(axis=1))         # per item, in the model worker
            label = pipe.submit(image[None]).result()         # service mode
            labels = pipe.apply_ordered([img1, img2, img3])    # Studio.ML mode
    """

    def __init__(self, *, queue_size: int = 1024, name: str = "pipe") -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, not {queue_size!r}")
        self.name = name
        self.queue_size = queue_size
        self._head: list[tuple[str, Func]] = []
        self._stages: list[_Stage] = []
        self._listeners: list[Callable[[BatchEvent], Any]] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._keras_model: Any = None
        self._inline_done = 0  # items completed in submit() (no stage); under _lock

    # -- building ------------------------------------------------------------------------------
    def add(
        self,
        func: Any,
        num_workers: int | None = None,
        batch_size: int | None = None,
        filterf: Callable[[Any], Any] | None = None,
        batcher: Callable[[list[Any]], Any] | None = None,
        timeout: float | None = None,
        *,
        max_batch_size: int | None = None,
        max_delay: float = 0.0,
        preferred_batch_sizes: Sequence[int] | None = None,
        adaptive: bool = False,
        latency_objective: float | None = None,
        splitter: Callable[[Any, list[int]], Sequence[Any]] | None = None,
        name: str | None = None,
        linger: float = 0.25,
    ) -> ModelPipe:
        """Append a function (or a Keras model) to the pipe; returns the pipe (chainable).

        With none of the options below, ``func`` composes with the previous function: no new
        queue or thread (Studio.ML's rule). Any option makes a new stage.

        :param func: ``item -> result``; for a batching stage ``batch -> outputs``; or a
            Keras model (recognised without importing Keras), which is warmed once on zeros,
            checked against its inputs per item, and made a batching stage
            (``max_batch_size`` 64 unless given).
        :param num_workers: worker threads for the stage (default 1).
        :param batch_size: Studio.ML's name for ``max_batch_size``.
        :param filterf: ``item -> bool``; a false value fails the item with
            :class:`~studioserve.errors.ItemFiltered` before the stage runs.
        :param batcher: ``list of items -> function input`` replacing the default stacking;
            the function must then return one output per item (or per row, for arrays),
            unless ``splitter`` says how to split.
        :param timeout: seconds an item may wait in this stage's queue before it fails with
            :class:`~studioserve.errors.DeadlineExceeded`.
        :param max_batch_size: most rows per call; makes the stage a batching stage (1 without
            ``batcher`` means one item per call, as Studio.ML's ``batch_size=1``).
        :param max_delay: seconds a worker waits after the first queued item for more
            (default 0: take what is queued now).
        :param preferred_batch_sizes: batch sizes to cut batches at when possible.
        :param adaptive: steer the batch limit with AIMD against ``latency_objective``.
        :param latency_objective: seconds a batch may take to compute (adaptive mode).
        :param splitter: ``(output, rows per item) -> one output per item``.
        :param name: the stage's name in stats, errors, logs and thread names.
        :param linger: fraction of a batch's compute time a *busy* batching stage may wait for
            items still arriving (never when idle; 0: never); see
            :class:`~studioserve.pipelines.Batcher`.
        :raises ValueError: for invalid options.
        :raises RuntimeError: after the pipe has started (first submit) or closed.
        """
        with self._lock:
            if self._started or self._closed:
                raise RuntimeError(
                    f"pipe {self.name!r} is already running; add() every stage before the first "
                    f"submit() or call, or build a new ModelPipe"
                )
        if batch_size is not None and max_batch_size is not None and batch_size != max_batch_size:
            raise ValueError(
                f"batch_size={batch_size} and max_batch_size={max_batch_size} disagree; "
                f"pass one of them (they are aliases)"
            )
        mbs = max_batch_size if max_batch_size is not None else batch_size
        if mbs is not None and (not isinstance(mbs, int) or mbs < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, not {mbs!r}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {num_workers!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if adaptive and mbs is None and not is_keras_model(func):
            raise ValueError("adaptive batching needs max_batch_size (the largest batch allowed)")
        if not callable(func):
            raise TypeError(f"add() needs a callable or a Keras model, not {type(func).__name__}")

        stage_name = name or _func_name(func)
        prepare: Callable[[Any], tuple[Any, int]] | None = None
        if is_keras_model(func):
            runner = KerasRunner(func)
            runner.warm()
            if self._keras_model is None:
                self._keras_model = func
            if mbs is None:
                mbs = DEFAULT_KERAS_BATCH_SIZE
            prepare = runner.prepare
            func = runner
        options = (
            num_workers is not None
            or mbs is not None
            or filterf is not None
            or batcher is not None
            or timeout is not None
            or splitter is not None
            or max_delay
            or preferred_batch_sizes
            or adaptive
            or prepare is not None
        )
        if not options:
            if self._stages:
                self._stages[-1].post.append((stage_name, func))
            else:
                self._head.append((stage_name, func))
            return self

        batching = mbs is not None and (mbs > 1 or batcher is not None or prepare is not None)
        if adaptive and not batching:
            raise ValueError("adaptive batching needs max_batch_size > 1")
        queue: Batcher[_Item] = Batcher(
            max_batch_size=mbs if batching and mbs is not None else 1,
            max_delay=max_delay if batching else 0.0,
            preferred_batch_sizes=preferred_batch_sizes if batching else None,
            maxsize=self.queue_size,
            adaptive=adaptive,
            latency_objective=latency_objective,
            linger=linger if batching else 0.0,
        )
        taken = {s.name for s in self._stages}
        unique = stage_name
        for i in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{stage_name}-{i}"
        stage = _Stage(
            name=unique,
            func=func,
            num_workers=max(1, num_workers or 1),
            batching=batching,
            queue=queue,
            filterf=filterf,
            batcher=batcher,
            splitter=splitter,
            timeout=timeout,
            prepare=prepare,
        )
        if self._stages:
            self._stages[-1].next = stage
        self._stages.append(stage)
        return self

    # -- properties ----------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        """The largest ``max_batch_size`` of any batching stage (1 without one)."""
        return max([s.queue.max_batch_size for s in self._stages if s.batching] or [1])

    @property
    def keras_model(self) -> Any:
        """The first Keras model given to :meth:`add`, or None."""
        return self._keras_model

    @property
    def stage_names(self) -> list[str]:
        """The stages' names, in order (composed functions are part of a stage)."""
        return [s.name for s in self._stages]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads (done by the first :meth:`submit` or call if not before)."""
        with self._lock:
            if self._closed:
                raise PipeClosed(f"pipe {self.name!r} is closed; build a new ModelPipe")
            if self._started:
                return
            for stage in self._stages:
                for i in range(stage.num_workers):
                    counters = _Counters()
                    stage.counters.append(counters)
                    t = threading.Thread(
                        target=self._worker,
                        args=(stage, counters),
                        name=f"studioserve-{self.name}-{stage.name}-{i}",
                        daemon=True,
                    )
                    stage.threads.append(t)
            for stage in self._stages:
                for t in stage.threads:
                    t.start()
            self._started = True

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting items, finish the queued ones, and join every worker thread.

        :param timeout: seconds to wait for queued items to finish; items still queued after
            that fail with :class:`~studioserve.errors.PipeClosed` (a function that never
            returns keeps its thread; it is a daemon and is logged).
        """
        with self._lock:
            if self._closed and not self._started:
                return
            self._closed = True
            started = self._started
        if not started:
            return
        end = None if timeout is None else _monotonic() + timeout

        def remaining() -> float | None:
            return None if end is None else max(0.0, end - _monotonic())

        aborted = False
        for stage in self._stages:
            if aborted:
                self._abort_queue(stage)
            else:
                stage.queue.close()
            for t in stage.threads:
                t.join(remaining())
            if not aborted and any(t.is_alive() for t in stage.threads):
                aborted = True
                for s in self._stages:
                    self._abort_queue(s)
        if aborted:
            # workers of aborted queues exit at once; one still inside its function does not
            grace = _monotonic() + 0.2
            for stage in self._stages:
                for t in stage.threads:
                    t.join(max(0.0, grace - _monotonic()))
                    if t.is_alive():
                        logger.warning(
                            "pipe %r: worker %s is still running after close(); its function "
                            "has not returned",
                            self.name,
                            t.name,
                        )

    def _abort_queue(self, stage: _Stage) -> None:
        for rec in stage.queue.abort():
            self._fail(
                rec,
                PipeClosed(
                    f"pipe {self.name!r} closed before item {rec.key!r} reached stage "
                    f"{stage.name!r}",
                    key=rec.key,
                    stage=stage.name,
                ),
            )

    def __enter__(self) -> ModelPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = [n for n, _ in self._head] + [s.name for s in self._stages]
        return f"<ModelPipe {self.name!r}: {' -> '.join(parts) or 'identity'}>"

    # -- service mode --------------------------------------------------------------------------
    def submit(
        self,
        item: Any,
        *,
        key: Any = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Future[Any]:
        """Send one item through the pipe.

        :param item: the first function's input.
        :param key: a name for the item in errors and logs (e.g. the request's key).
        :param deadline: an absolute :func:`time.monotonic` time; if it passes before a stage
            computes the item, the item fails with :class:`~studioserve.errors.DeadlineExceeded`.
        :param timeout: the same as a deadline ``timeout`` seconds from now (the earlier of the
            two wins when both are given).
        :returns: a future for the last function's output; its exception, if any, is a
            :class:`~studioserve.errors.PipelineError` naming the key and the stage.
        :raises Overloaded: at once, when the first stage's queue is full (``retry_after`` says
            when to try again).
        :raises PipeClosed: after :meth:`close`.
        :raises ValueError: for a negative ``timeout``.
        """
        if timeout is not None:
            if timeout < 0:
                raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
            limit = _monotonic() + timeout
            deadline = limit if deadline is None else min(deadline, limit)
        return self._submit(item, key, deadline, False)

    def _submit(self, item: Any, key: Any, deadline: float | None, block: bool) -> Future[Any]:
        if self._closed:
            raise PipeClosed(f"pipe {self.name!r} is closed; it accepts no more items", key=key)
        if not self._started:
            self.start()
        fut: Future[Any] = Future()
        rec = _Item(key, item, fut, deadline)
        value = item
        for sname, f in self._head:
            try:
                value = f(value)
            except Exception as e:
                self._fail(rec, _item_failed(e, key, sname))
                return fut
        stage = self._stages[0] if self._stages else None
        if stage is None:
            try:
                fut.set_result(value)
            except InvalidStateError:  # pragma: no cover - nobody else holds it yet
                pass
            with self._lock:
                self._inline_done += 1
            return fut
        if deadline is not None and _monotonic() > deadline:
            self._fail(rec, _expired(key, stage.name, 0.0))
            return fut
        self._enter(rec, value, stage, block)
        return fut

    def _enter(self, rec: _Item, value: Any, stage: _Stage, block: bool) -> bool:
        """Check ``value`` for ``stage`` and queue it; False when the item failed instead."""
        if stage.filterf is not None:
            try:
                keep = stage.filterf(value)
            except Exception as e:
                stage.count_rejected()
                self._fail(rec, _item_failed(e, rec.key, stage.name, "filterf of stage"))
                return False
            if not keep:
                stage.count_rejected()
                self._fail(
                    rec,
                    ItemFiltered(
                        f"item {rec.key!r} was dropped by the filterf of stage {stage.name!r}",
                        key=rec.key,
                        stage=stage.name,
                    ),
                )
                return False
        if stage.prepare is not None:
            try:
                value, rows = stage.prepare(value)
            except PipelineError as e:
                e.key, e.stage = rec.key, stage.name
                e.args = (f"item {rec.key!r} does not fit stage {stage.name!r}: {e}",)
                stage.count_rejected()
                self._fail(rec, e)
                return False
            except Exception as e:
                stage.count_rejected()
                self._fail(rec, _item_failed(e, rec.key, stage.name, "input check of stage"))
                return False
        elif stage.batching:
            if type(value) is ndarray:
                rows = value.shape[0] if value.ndim else 1
            else:
                rows = row_count(value)
        else:
            rows = 1
        rec.value = value
        if block:
            try:
                stage.queue.put_wait(rec, rows)
            except PipeClosed:
                self._fail(
                    rec,
                    PipeClosed(
                        f"pipe {self.name!r} closed before item {rec.key!r} reached stage "
                        f"{stage.name!r}",
                        key=rec.key,
                        stage=stage.name,
                    ),
                )
                return False
            return True
        try:
            ok = stage.queue.put(rec, rows)
        except PipeClosed:
            raise PipeClosed(
                f"pipe {self.name!r} is closed; it accepts no more items", key=rec.key
            ) from None
        if not ok:
            raise Overloaded(
                f"pipe {self.name!r} is overloaded: {len(stage.queue)} items are waiting for "
                f"stage {stage.name!r}; retry after {self._retry_after(stage):.2f} s, or "
                f"raise queue_size / add workers",
                key=rec.key,
                stage=stage.name,
                retry_after=self._retry_after(stage),
            )
        return True

    def _retry_after(self, stage: _Stage) -> float:
        items = sum(c.items for c in stage.counters)
        compute = sum(c.compute for c in stage.counters)
        per_item = compute / items if items else 0.01
        est = len(stage.queue) * per_item / max(1, stage.num_workers)
        return float(min(30.0, max(0.1, est)))

    def _fail(self, rec: _Item, error: BaseException) -> None:
        try:
            rec.future.set_exception(error)
        except InvalidStateError:  # cancelled by its owner
            pass

    # -- workers -------------------------------------------------------------------------------
    def _worker(self, stage: _Stage, counters: _Counters) -> None:
        try:
            self._work(stage, counters)
        except BaseException:  # pragma: no cover - a bug in the pipe itself
            logger.exception("pipe %r: worker of stage %r died", self.name, stage.name)
            for rec in stage.queue.abort():
                self._fail(
                    rec,
                    ItemFailed(
                        f"pipe {self.name!r}: stage {stage.name!r} stopped working",
                        key=rec.key,
                        stage=stage.name,
                    ),
                )
            raise

    def _work(self, stage: _Stage, counters: _Counters) -> None:
        get = stage.queue.get_batch_entries
        record = stage.queue.record
        timeout = stage.timeout
        name = stage.name
        nxt = stage.next
        post = stage.post
        batching = stage.batching
        func = stage.func
        listeners = self._listeners
        fail = self._fail
        while True:
            entries = get()
            if entries is None:
                return
            now = _monotonic()
            recs: list[_Item] = []
            rows: list[int] = []
            waits: list[float] = []
            for rec, r, t in entries:
                w = now - t
                d = rec.deadline
                if (d is not None and now > d) or (timeout is not None and w > timeout):
                    counters.done += 1  # before the future completes: stats stay exact
                    counters.failures += 1
                    fail(rec, _expired(rec.key, name, w))
                    continue
                if w > 0.05 and rec.future.cancelled():  # its owner gave up waiting
                    counters.done += 1
                    continue
                recs.append(rec)
                rows.append(r)
                waits.append(w)
            if not recs:
                continue
            n = len(recs)
            nrows = sum(rows)
            t0 = _perf()
            if batching:
                outs = self._compute_batch(stage, recs, rows)
            else:
                rec = recs[0]
                try:
                    outs = [func(rec.value)]
                except Exception as e:
                    outs = [_Failure(_item_failed(e, rec.key, name))]
            dt = _perf() - t0
            record(nrows, dt)
            # bookkeeping first: once futures complete, their owners wait for this thread's GIL
            counters.items += n
            counters.batches += 1
            counters.compute += dt
            counters.wait += sum(waits)
            hist = counters.hist
            hist[nrows] = hist.get(nrows, 0) + 1
            if nxt is None and not post:
                # the common case, kept lean: every item completes here
                failed = sum(type(out) is _Failure for out in outs)
                counters.failures += failed
                counters.done += n
                for rec, out in zip(recs, outs, strict=True):
                    if type(out) is _Failure:
                        fail(rec, out.error)
                        continue
                    try:
                        rec.future.set_result(out)
                    except InvalidStateError:  # cancelled by its owner
                        pass
            else:
                failed = 0
                for rec, out in zip(recs, outs, strict=True):
                    if post and type(out) is not _Failure:
                        out = self._run_post(post, rec, out)
                    if type(out) is _Failure:
                        failed += 1
                        counters.failures += 1
                        counters.done += 1
                        fail(rec, out.error)
                    elif nxt is None:
                        counters.done += 1
                        try:
                            rec.future.set_result(out)
                        except InvalidStateError:  # cancelled by its owner
                            pass
                    elif not self._enter(rec, out, nxt, True):
                        counters.done += 1
            if listeners:
                self._notify(BatchEvent(name, n, nrows, tuple(waits), dt, n - failed, failed))

    def _run_post(self, post: list[tuple[str, Func]], rec: _Item, value: Any) -> Any:
        for pname, f in post:
            try:
                value = f(value)
            except Exception as e:
                return _Failure(_item_failed(e, rec.key, pname))
        return value

    def _notify(self, event: BatchEvent) -> None:
        for cb in list(self._listeners):
            try:
                cb(event)
            except Exception:
                logger.exception("pipe %r: batch listener %r raised; ignored", self.name, cb)

    def _compute_batch(self, stage: _Stage, recs: list[_Item], rows: list[int]) -> list[Any]:
        values = [r.value for r in recs]
        results: list[Any] = [None] * len(values)
        if stage.batcher is not None:
            self._run_group(stage, recs, values, rows, list(range(len(values))), results, None)
        else:
            for group in collate(values):
                self._run_group(stage, recs, values, rows, group.indices, results, group)
        return results

    def _run_group(
        self,
        stage: _Stage,
        recs: list[_Item],
        values: list[Any],
        rows: list[int],
        idx: list[int],
        results: list[Any],
        group: Collated | None,
    ) -> None:
        """Call the stage on ``idx``; on an exception, bisect to find the items to blame."""
        try:
            outs = self._call_batch(stage, [values[i] for i in idx], [rows[i] for i in idx], group)
        except BatchRowsError as e:
            what = "rows" if e.expected == sum(rows[i] for i in idx) else "outputs"
            n = len(idx)
            msg = (
                f"stage {stage.name!r} returned {e.got if e.got is not None else 'no sized'} "
                f"{what} for {e.expected} input {what} (a batch of {n} items). Hint: a batched "
                f"function must return one output per input row, in order; check that it does "
                f"not reduce over axis 0, or pass a splitter to add()"
            )
            logger.warning("pipe %r: %s", self.name, msg)
            for i in idx:
                results[i] = _Failure(BatchSizeMismatch(msg, key=recs[i].key, stage=stage.name))
            return
        except Exception as e:
            if len(idx) == 1:
                i = idx[0]
                logger.warning(
                    "pipe %r: stage %r raised for item %r: %s: %s",
                    self.name,
                    stage.name,
                    recs[i].key,
                    type(e).__name__,
                    e,
                )
                results[i] = _Failure(_item_failed(e, recs[i].key, stage.name))
                return
            mid = len(idx) // 2
            self._run_group(stage, recs, values, rows, idx[:mid], results, None)
            self._run_group(stage, recs, values, rows, idx[mid:], results, None)
            return
        for i, o in zip(idx, outs, strict=True):
            results[i] = o

    def _call_batch(
        self, stage: _Stage, values: list[Any], rows: list[int], group: Collated | None
    ) -> list[Any]:
        n = len(values)
        if stage.batcher is not None:
            out = stage.func(stage.batcher(values))
            if stage.splitter is not None:
                return _split_custom(stage.splitter, out, rows, n)
            try:
                return split_items(out, n)
            except BatchRowsError:
                if sum(rows) == n:
                    raise
                return split_rows(out, rows)
        if group is None:
            groups = collate(values)
            if len(groups) != 1:  # pragma: no cover - subsets of a group share its signature
                raise RuntimeError("items of one group no longer stack together")
            group = groups[0]
        out = stage.func(group.data)
        if stage.splitter is not None:
            return _split_custom(stage.splitter, out, group.rows or [1] * n, n)
        if group.rows is None:
            return split_items(out, n)
        return split_rows(out, group.rows)

    # -- observability -------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[BatchEvent], Any]) -> None:
        """Call ``callback(event)`` after every batch (in the worker; keep it quick).

        A listener that raises is logged and ignored; it never breaks the pipe.
        """
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[BatchEvent], Any]) -> None:
        """Stop calling a listener added with :meth:`add_listener`."""
        with self._lock:
            self._listeners.remove(callback)

    def stats(self) -> PipeStats:
        """A snapshot of every stage's counters and the number of items in flight."""
        stages: dict[str, StageStats] = {}
        done = self._inline_done
        for s in self._stages:
            cs = list(s.counters)
            hist: dict[int, int] = {}
            for c in cs:
                for k, v in dict(c.hist).items():
                    hist[k] = hist.get(k, 0) + v
                done += c.done
            stages[s.name] = StageStats(
                name=s.name,
                workers=s.num_workers,
                batching=s.batching,
                max_batch_size=s.queue.max_batch_size,
                batch_limit=s.queue.limit,
                items=sum(c.items for c in cs),
                batches=sum(c.batches for c in cs),
                failures=sum(c.failures for c in cs) + s.rejected,
                batch_sizes=dict(sorted(hist.items())),
                compute_seconds=sum(c.compute for c in cs),
                queue_wait_seconds=sum(c.wait for c in cs),
                queue_depth=len(s.queue),
            )
        accepted = self._stages[0].queue.accepted if self._stages else self._inline_done
        return PipeStats(stages=stages, in_flight=max(0, accepted - done), accepted=accepted)

    # -- Studio.ML's mode ----------------------------------------------------------------------
    def __call__(self, data: Any) -> Any:
        """Same as :meth:`apply_unordered`."""
        return self.apply_unordered(data)

    def apply_unordered(self, data: Any) -> Any:
        """Run every item of ``data`` through the pipe; results in completion order.

        Studio.ML's shapes: a dict gives a dict with the same keys; a list gives a list of
        ``(index, result)`` pairs; a set gives a set of results; a generator (or any other
        iterable) gives a generator of ``(index, result)`` pairs, streamed while it is consumed.
        Items that fail or are filtered out are left out and logged with their key and stage.

        :raises PipeClosed: after :meth:`close`.
        """
        if isinstance(data, dict):
            return dict(self._stream(iter(data.items()), ordered=False))
        if isinstance(data, list):
            return list(self._stream(enumerate(data), ordered=False))
        if isinstance(data, (set, frozenset)):
            return {v for _, v in self._stream(enumerate(data), ordered=False)}
        return self._stream(enumerate(data), ordered=False)

    def apply_ordered(self, data: Any) -> Any:
        """Like :meth:`apply_unordered`, but a list or generator gives results in input order.

        A list gives a list of results (failed items left out); a generator or other iterable
        gives a generator of results; dicts and sets are as :meth:`apply_unordered`.
        """
        if isinstance(data, dict):
            return dict(self._stream(iter(data.items()), ordered=True))
        if isinstance(data, (set, frozenset)):
            return self.apply_unordered(data)
        if isinstance(data, list):
            return [v for _, v in self._stream(enumerate(data), ordered=True)]
        return (v for _, v in self._stream(enumerate(data), ordered=True))

    def _window(self) -> int:
        workers = sum(s.num_workers for s in self._stages) or 1
        return max(2, min(self.queue_size, 4 * self.max_batch_size * workers))

    def _stream(self, pairs: Iterator[tuple[Any, Any]], ordered: bool) -> Iterator[tuple[Any, Any]]:
        if self._closed:
            raise PipeClosed(f"pipe {self.name!r} is closed; build a new ModelPipe")
        return self._stream_gen(pairs, ordered)

    def _stream_gen(
        self, pairs: Iterator[tuple[Any, Any]], ordered: bool
    ) -> Generator[tuple[Any, Any], None, None]:
        window = self._window()
        pending: deque[tuple[Any, Future[Any]]] = deque()
        done: SimpleQueue[Future[Any]] = SimpleQueue()
        keys: dict[Future[Any], Any] = {}
        outstanding = 0
        exhausted = False
        while True:
            while not exhausted and outstanding < window:
                try:
                    key, value = next(pairs)
                except StopIteration:
                    exhausted = True
                    break
                fut = self._submit(value, key, None, True)
                outstanding += 1
                if ordered:
                    pending.append((key, fut))
                else:
                    keys[fut] = key
                    fut.add_done_callback(done.put)
            if outstanding == 0:
                return
            if ordered:
                key, fut = pending.popleft()
            else:
                fut = done.get()
                key = keys.pop(fut)
            outstanding -= 1
            try:
                result = fut.result()
            except Exception as e:
                err: BaseException = e
            else:
                yield key, result
                continue
            if isinstance(err, ItemFiltered):
                logger.debug("pipe %r: %s", self.name, err)
            else:
                stage = getattr(err, "stage", None)
                logger.warning(
                    "pipe %r: item %r failed in stage %r and is left out: %s",
                    self.name,
                    key,
                    stage,
                    err,
                )


def _item_failed(e: Exception, key: Any, stage: str, what: str = "stage") -> PipelineError:
    if isinstance(e, PipelineError):
        if e.key is None:
            e.key = key
        if e.stage is None:
            e.stage = stage
        return e
    err = ItemFailed(
        f"{what} {stage!r} raised {type(e).__name__} for item {key!r}: {e}",
        key=key,
        stage=stage,
    )
    err.__cause__ = e
    return err


def _expired(key: Any, stage: str, waited: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"item {key!r} passed its deadline before stage {stage!r} could run it (it waited "
        f"{waited:.3f} s in the queue); allow more time or reduce the load",
        key=key,
        stage=stage,
    )


def _split_custom(
    splitter: Callable[[Any, list[int]], Sequence[Any]], out: Any, rows: list[int], n: int
) -> list[Any]:
    parts = list(splitter(out, rows))
    if len(parts) != n:
        raise BatchRowsError(len(parts), n)
    return parts
