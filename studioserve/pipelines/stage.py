"""One stage of a pipe: its checks on the way in, its queue, and its workers' loop.

A stage is a bounded queue (:class:`~studioserve.pipelines.Batcher`) and persistent worker
threads that call the stage's function, per item or on batches, then the functions composed
after it (``post``), then hand each item to the next stage or complete its future. Where an
item's work happens, for ``pipe.add(pre).add(model, batch_size=32).add(post)``::

    submitting thread: pre(item), checks for the model stage   -> queue (bounded)
    model worker:      model(stacked batch), split per item, post(row) -> future

A single-stage pipe hands each item over once (one queue, one thread hop each way).
:meth:`Stage.enter` (the checks and the queueing) runs in the thread that hands the item over:
the submitting thread for the first stage, the previous stage's worker for the others.

Failures are per item: a stage that raises fails only the items it raised for (a batched call
that raises is re-run in halves, then singly, to find them), and the future carries an error
from :mod:`studioserve.errors` naming the item's key and the stage. See
:mod:`studioserve.pipelines.batching` for the batching policies and when to use which.

Instances (Triton's instance groups): every worker of a stage is one instance, and worker ``i``
calls instance ``i``'s function: the copy given for it in ``add(instances=[...])``, a runner of
its own copy of a Keras model, or the stage's one function when the workers share it. All of
them take batches from the stage's one queue, so whichever instance is free takes the next
batch; each counts in its own :class:`Counters` and says its index in every
:class:`~studioserve.pipelines.BatchEvent`.

The worker loop (:meth:`Stage._work`) is the pipe's hot path: it caches what it uses in local
variables and does as little as it can per item.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

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
from .events import BatchEvent, logger
from .keras_stage import KerasRunner, clone_runner
from .options import StageOptions

__all__ = [
    "Completion",
    "Counters",
    "Func",
    "Item",
    "Listener",
    "Stage",
    "expired",
    "fail_item",
    "item_failed",
]

_monotonic = time.monotonic
_perf = time.perf_counter

#: the longest measured batch time for which an idle stage computes a lone item in the
#: submitting thread (:meth:`Stage.run_inline`): about what the two thread hand-offs it saves
#: cost, so a model that slow loses little by it and a slower one never blocks the caller
INLINE_MAX_SECONDS = 0.0005

Func = Callable[[Any], Any]
Listener = Callable[[BatchEvent], Any]


class Completion(Protocol):
    """What an item's result goes to: a :class:`concurrent.futures.Future`, or a
    :class:`~studioserve.pipelines.completion.LoopSlot` for a coroutine."""

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...

    def cancelled(self) -> bool: ...


class Item:
    """One submitted item on its way through the stages."""

    __slots__ = ("deadline", "future", "key", "value")

    def __init__(
        self, key: Any, value: Any, future: Completion | Future[Any], deadline: float | None
    ) -> None:
        self.key = key
        self.value = value
        self.future = future
        self.deadline = deadline


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Counters:
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


class Stage:
    """A stage built from one ``add()``'s :class:`StageOptions`.

    :param name: the stage's name, unique in its pipe.
    :param queue_size: most items waiting in the stage's queue.
    :param pipe: the pipe's name (in thread names, errors and logs).
    :param listeners: the pipe's batch listeners (the pipe's own list, shared).
    """

    def __init__(
        self,
        options: StageOptions,
        *,
        name: str,
        queue_size: int,
        pipe: str,
        listeners: list[Listener],
    ) -> None:
        batching = options.batching
        rows = options.rows
        # the queue first: it checks its settings before a Keras model is warmed
        self.queue: Batcher[Item] = Batcher(
            max_batch_size=rows if batching and rows is not None else 1,
            max_delay=options.max_delay if batching else 0.0,
            preferred_batch_sizes=options.preferred_batch_sizes if batching else None,
            maxsize=queue_size,
            adaptive=options.adaptive,
            latency_objective=options.latency_objective,
            linger=options.linger if batching else 0.0,
        )
        self.name = name
        self.pipe = pipe
        self.prepare: Callable[[Any], tuple[Any, int]] | None = None
        #: per instance (worker ``i`` calls ``funcs[i]``), its function and its device label
        self.funcs: list[Func] = self._instances(options)
        self.devices: tuple[str | None, ...] = options.device_labels
        self.func: Func = self.funcs[0]
        self.num_workers = len(self.funcs)
        self.batching = batching
        self.filterf = options.filterf
        self.batcher = options.batcher
        self.splitter = options.splitter
        self.timeout = options.timeout
        self.listeners = listeners
        self.post: list[tuple[str, Func]] = []
        self.next: Stage | None = None
        self.threads: list[threading.Thread] = []
        self.counters: list[Counters] = []
        self.rejected = 0  # items failed on the way in (filter, input checks); under _lock
        self._lock = threading.Lock()
        #: held by whoever computes on instance ``i`` (its worker, or an inline call)
        self.computing = [threading.Lock() for _ in self.funcs]
        #: whether an idle stage may compute an item in the submitting thread
        #: (:meth:`run_inline`): unless ``max_delay`` asks every batch to wait for more items
        #: (``linger`` waits only while the stage is busy, never for a lone item)
        self.inlinable = not batching or options.max_delay == 0.0

    def _instances(self, options: StageOptions) -> list[Func]:
        """The function of each instance; for a Keras model, a warmed runner per copy (and
        :attr:`prepare`, the input check they share).

        ``instances=[...]`` gives the copies (taken as given); a Keras model given
        ``instances=N`` (or N ``devices``) is cloned N - 1 times, each clone built on its
        instance's device and checked to answer as the model does; otherwise every worker
        shares ``func`` (``num_workers``, or ``instances=N`` for a function, which cannot be
        copied).
        """
        n = options.workers
        copies = options.copies
        if not options.keras:
            return list(copies) if copies is not None else [options.func] * n
        labels = options.device_labels
        placed = options.instances is not None or options.devices is not None
        if copies is None and not (placed and n > 1):
            runner = _runner(options.func, labels[0])
            runner.warm()
            self.prepare = runner.prepare
            return [runner] * n
        if copies is None:  # clones, each on its device and checked against the model
            first = _runner(options.func, labels[0])
            first.warm()
            runners = [first]
            for label in labels[1:]:
                try:
                    runners.append(clone_runner(options.func, label, first))
                except ValueError as e:
                    raise ValueError(
                        f"stage {self.name!r}: {e}; pass the copies themselves as "
                        f"instances=[model, copy, ...] (load the model once per instance)"
                    ) from e
            self.prepare = first.prepare
            return list(runners)
        runners = [_runner(m, labels[i]) for i, m in enumerate(copies)]
        first = runners[0]
        want = [(s.shape, s.dtype) for s in first.specs or ()]
        for i, r in enumerate(runners[1:], 1):
            got = [(s.shape, s.dtype) for s in r.specs or ()]
            if got != want:
                raise ValueError(
                    f"stage {self.name!r}: instance {i} takes inputs {got}, instance 0 takes "
                    f"{want}; every instance must be a copy of the same model"
                )
        for r in runners:
            r.warm()
        self.prepare = first.prepare
        return list(runners)

    # -- on the way in -------------------------------------------------------------------------
    def enter(self, rec: Item, value: Any, block: bool, inline: bool = False) -> bool:
        """Check ``value`` for this stage and queue it; False when the item failed instead.

        :param block: wait for room in the queue (else raise :class:`Overloaded` when full).
        :param inline: compute it here and now if the stage is idle and its calls are cheap
            (:meth:`run_inline`), else queue it.
        """
        if self.filterf is not None:
            try:
                keep = self.filterf(value)
            except Exception as e:
                return self._reject(rec, item_failed(e, rec.key, self.name, "filterf of stage"))
            if not keep:
                return self._reject(
                    rec,
                    ItemFiltered(
                        f"item {rec.key!r} was dropped by the filterf of stage {self.name!r}",
                        key=rec.key,
                        stage=self.name,
                    ),
                )
        if self.prepare is not None:
            try:
                value, rows = self.prepare(value)
            except PipelineError as e:
                e.key, e.stage = rec.key, self.name
                e.args = (f"item {rec.key!r} does not fit stage {self.name!r}: {e}",)
                return self._reject(rec, e)
            except Exception as e:
                return self._reject(rec, item_failed(e, rec.key, self.name, "input check of stage"))
        elif self.batching:
            if type(value) is ndarray:
                rows = value.shape[0] if value.ndim else 1
            else:
                rows = row_count(value)
        else:
            rows = 1
        rec.value = value
        if inline and self.run_inline(rec, rows):
            return True
        if block:
            try:
                self.queue.put_wait(rec, rows)
            except PipeClosed:
                fail_item(rec, self._closed_before(rec))
                return False
            return True
        try:
            ok = self.queue.put(rec, rows)
        except PipeClosed:
            raise PipeClosed(
                f"pipe {self.pipe!r} is closed; it accepts no more items", key=rec.key
            ) from None
        if not ok:
            retry_after = self.retry_after()
            raise Overloaded(
                f"pipe {self.pipe!r} is overloaded: {len(self.queue)} items are waiting for "
                f"stage {self.name!r}; retry after {retry_after:.2f} s, or "
                f"raise queue_size / add workers",
                key=rec.key,
                stage=self.name,
                retry_after=retry_after,
            )
        return True

    def _reject(self, rec: Item, error: BaseException) -> bool:
        """Fail an item that did not get into the stage; False (for :meth:`enter`)."""
        with self._lock:
            self.rejected += 1
        fail_item(rec, error)
        return False

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained (from the compute time so far)."""
        items = sum(c.items for c in self.counters)
        compute = sum(c.compute for c in self.counters)
        per_item = compute / items if items else 0.01
        est = len(self.queue) * per_item / max(1, self.num_workers)
        return float(min(30.0, max(0.1, est)))

    def _closed_before(self, rec: Item) -> PipeClosed:
        return PipeClosed(
            f"pipe {self.pipe!r} closed before item {rec.key!r} reached stage {self.name!r}",
            key=rec.key,
            stage=self.name,
        )

    def abort(self) -> None:
        """Empty the queue at once, failing every item in it with :class:`PipeClosed`."""
        for rec in self.queue.abort():
            fail_item(rec, self._closed_before(rec))

    # -- workers -------------------------------------------------------------------------------
    def create_workers(self) -> None:
        """Create (not start) the stage's worker threads, each with its own counters."""
        for i in range(self.num_workers):
            counters = Counters()
            self.counters.append(counters)
            t = threading.Thread(
                target=self._worker,
                args=(counters, i),
                name=f"studioserve-{self.pipe}-{self.name}-{i}",
                daemon=True,
            )
            self.threads.append(t)

    def _worker(self, counters: Counters, index: int) -> None:
        try:
            self._work(counters, index)
        except BaseException:  # pragma: no cover - a bug in the pipe itself
            logger.exception("pipe %r: worker of stage %r died", self.pipe, self.name)
            for rec in self.queue.abort():
                fail_item(
                    rec,
                    ItemFailed(
                        f"pipe {self.pipe!r}: stage {self.name!r} stopped working",
                        key=rec.key,
                        stage=self.name,
                    ),
                )
            raise

    def _work(self, counters: Counters, index: int) -> None:
        """Worker ``index``'s loop: instance ``index``'s batches until the queue closes."""
        get = self.queue.get_batch_entries
        timeout = self.timeout
        name = self.name
        computing = self.computing[index]
        fail = fail_item
        while True:
            entries = get()
            if entries is None:
                return
            now = _monotonic()
            recs: list[Item] = []
            rows: list[int] = []
            waits: list[float] = []
            for rec, r, t in entries:
                w = now - t
                d = rec.deadline
                if (d is not None and now > d) or (timeout is not None and w > timeout):
                    counters.done += 1  # before the future completes: stats stay exact
                    counters.failures += 1
                    fail(rec, expired(rec.key, name, w))
                    continue
                if w > 0.05 and rec.future.cancelled():  # its owner gave up waiting
                    counters.done += 1
                    continue
                recs.append(rec)
                rows.append(r)
                waits.append(w)
            if not recs:
                continue
            with computing:
                self._run(counters, index, recs, rows, waits)

    def run_inline(self, rec: Item, rows: int) -> bool:
        """Compute one item now, in this thread, as a batch of one; False (nothing done) unless
        the stage is idle: no item queued, instance 0 not computing, nothing configured to wait
        for more items, and its measured batch time under :data:`INLINE_MAX_SECONDS`.

        A lone request then pays no thread hand-off either way; under concurrency the items
        queue and batch as always (the caller only asks when no other request is in flight
        for this model). Counted, timed and reported exactly as a worker's batch.
        """
        ema = self.queue.compute_ema
        if not self.inlinable or self.next is not None or not 0.0 < ema <= INLINE_MAX_SECONDS:
            return False
        lock = self.computing[0]
        if not lock.acquire(blocking=False):
            return False
        try:
            if len(self.queue):
                return False
            self._run(self.counters[0], 0, [rec], [rows], [0.0])
        finally:
            lock.release()
        return True

    def _run(
        self,
        counters: Counters,
        index: int,
        recs: list[Item],
        rows: list[int],
        waits: list[float],
    ) -> None:
        """Compute one batch on instance ``index`` (its ``computing`` lock held), timed, then
        :meth:`_finish` it."""
        func = self.funcs[index]
        t0 = _perf()
        if self.batching:
            outs = self._compute_batch(func, recs, rows)
        else:
            rec = recs[0]
            try:
                outs = [func(rec.value)]
            except Exception as e:
                outs = [_Failure(item_failed(e, rec.key, self.name))]
        self._finish(counters, index, recs, rows, waits, outs, _perf() - t0)

    def _finish(
        self,
        counters: Counters,
        index: int,
        recs: list[Item],
        rows: list[int],
        waits: list[float],
        outs: list[Any],
        dt: float,
    ) -> None:
        """After one batch on instance ``index``: count it, complete or pass on each item,
        tell the listeners (under the instance's lock: its counters have one writer)."""
        n = len(recs)
        nrows = sum(rows)
        self.queue.record(nrows, dt)
        # bookkeeping first: once futures complete, their owners wait for this thread's GIL
        counters.items += n
        counters.batches += 1
        counters.compute += dt
        counters.wait += sum(waits)
        hist = counters.hist
        hist[nrows] = hist.get(nrows, 0) + 1
        nxt = self.next
        post = self.post
        fail = fail_item
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
                    out = _run_post(post, rec, out)
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
                elif not nxt.enter(rec, out, True):
                    counters.done += 1
        if self.listeners:
            self._notify(
                BatchEvent(self.name, n, nrows, tuple(waits), dt, n - failed, failed, index)
            )

    def _notify(self, event: BatchEvent) -> None:
        for cb in list(self.listeners):
            try:
                cb(event)
            except Exception:
                logger.exception("pipe %r: batch listener %r raised; ignored", self.pipe, cb)

    # -- one batch -----------------------------------------------------------------------------
    def _compute_batch(self, func: Func, recs: list[Item], rows: list[int]) -> list[Any]:
        values = [r.value for r in recs]
        results: list[Any] = [None] * len(values)
        if self.batcher is not None:
            self._run_group(func, recs, values, rows, list(range(len(values))), results, None)
        else:
            for group in collate(values):
                self._run_group(func, recs, values, rows, group.indices, results, group)
        return results

    def _run_group(
        self,
        func: Func,
        recs: list[Item],
        values: list[Any],
        rows: list[int],
        idx: list[int],
        results: list[Any],
        group: Collated | None,
    ) -> None:
        """Call ``func`` (this worker's instance) on ``idx``; on an exception, bisect to find
        the items to blame."""
        try:
            outs = self._call_batch(func, [values[i] for i in idx], [rows[i] for i in idx], group)
        except BatchRowsError as e:
            what = "rows" if e.expected == sum(rows[i] for i in idx) else "outputs"
            n = len(idx)
            msg = (
                f"stage {self.name!r} returned {e.got if e.got is not None else 'no sized'} "
                f"{what} for {e.expected} input {what} (a batch of {n} items). Hint: a batched "
                f"function must return one output per input row, in order; check that it does "
                f"not reduce over axis 0, or pass a splitter to add()"
            )
            logger.warning("pipe %r: %s", self.pipe, msg)
            for i in idx:
                results[i] = _Failure(BatchSizeMismatch(msg, key=recs[i].key, stage=self.name))
            return
        except Exception as e:
            if len(idx) == 1:
                i = idx[0]
                logger.warning(
                    "pipe %r: stage %r raised for item %r: %s: %s",
                    self.pipe,
                    self.name,
                    recs[i].key,
                    type(e).__name__,
                    e,
                )
                results[i] = _Failure(item_failed(e, recs[i].key, self.name))
                return
            mid = len(idx) // 2
            self._run_group(func, recs, values, rows, idx[:mid], results, None)
            self._run_group(func, recs, values, rows, idx[mid:], results, None)
            return
        for i, o in zip(idx, outs, strict=True):
            results[i] = o

    def _call_batch(
        self, func: Func, values: list[Any], rows: list[int], group: Collated | None
    ) -> list[Any]:
        n = len(values)
        if self.batcher is not None:
            out = func(self.batcher(values))
            if self.splitter is not None:
                return _split_custom(self.splitter, out, rows, n)
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
        out = func(group.data)
        if self.splitter is not None:
            return _split_custom(self.splitter, out, group.rows or [1] * n, n)
        if group.rows is None:
            return split_items(out, n)
        return split_rows(out, group.rows)


def _runner(model: Any, device: str | None) -> KerasRunner:
    """A runner for one instance's Keras model (placed on ``device`` when it has one)."""
    return KerasRunner(model) if device is None else KerasRunner(model, device=device)


def fail_item(rec: Item, error: BaseException) -> None:
    """Complete an item's future with ``error`` (unless its owner cancelled it)."""
    try:
        rec.future.set_exception(error)
    except InvalidStateError:  # cancelled by its owner
        pass


def _run_post(post: list[tuple[str, Func]], rec: Item, value: Any) -> Any:
    for pname, f in post:
        try:
            value = f(value)
        except Exception as e:
            return _Failure(item_failed(e, rec.key, pname))
    return value


def item_failed(e: Exception, key: Any, stage: str, what: str = "stage") -> PipelineError:
    """The error for an item whose function raised ``e`` (``e`` itself if it names one)."""
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


def expired(key: Any, stage: str, waited: float) -> DeadlineExceeded:
    """The error for an item that passed its deadline before ``stage`` ran it."""
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
