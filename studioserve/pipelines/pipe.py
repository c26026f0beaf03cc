"""ModelPipe: Studio.ML's pipeline API as a long-lived service that batches across requests.

A pipe is a chain of functions. Each :meth:`ModelPipe.add` with an option (``num_workers``,
``batch_size``, ``filterf``, ...) starts a *stage* (:mod:`~studioserve.pipelines.stage`): a
bounded queue and persistent worker threads. An ``add()`` without options composes with the
function before it (Studio.ML's rule), so it costs no queue and no thread: functions added
before the first stage run in the thread that submits, functions added after a stage run in
that stage's workers, per item. A Keras model given to ``add()`` becomes a batching stage of
its own. A stage may run several instances (Triton's instance groups): ``add(..., instances=)``
gives each worker its own copy of the function (or of the Keras model, on its own device), all
fed by the stage's one queue.

This module holds the pipe itself: building it, starting and closing its stages, submitting
items, and its stats and listeners. Two ways in:

* service mode: :meth:`ModelPipe.submit` returns a :class:`concurrent.futures.Future`, and
  :meth:`ModelPipe.submit_async` an :class:`asyncio.Future` of the calling loop (completed a
  batch at a time, :mod:`~studioserve.pipelines.completion`); items submitted by many threads
  and coroutines meet in a batching stage's queue and run in one call;
* Studio.ML's mode: ``pipe(data)`` / :meth:`~ModelPipe.apply_ordered` on a dict, list, set or
  generator, which streams the items through the same threads
  (:mod:`~studioserve.pipelines.studioml`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ..errors import PipeClosed
from . import studioml
from .completion import LoopSlot, completions_for
from .events import BatchEvent, InstanceStats, PipeLoad, PipeStats, StageStats, logger
from .options import StageOptions
from .stage import (
    Completion,
    Counters,
    Func,
    Item,
    Listener,
    Stage,
    expired,
    fail_item,
    item_failed,
)

__all__ = ["BatchEvent", "InstanceStats", "ModelPipe", "PipeLoad", "PipeStats", "StageStats"]

_monotonic = time.monotonic


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
        self._stages: list[Stage] = []
        self._listeners: list[Listener] = []
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
        instances: int | Sequence[Any] | None = None,
        devices: Sequence[str] | None = None,
    ) -> ModelPipe:
        """Append a function (or a Keras model) to the pipe; returns the pipe (chainable).

        With none of the options below, ``func`` composes with the previous function: no new
        queue or thread (Studio.ML's rule). Any option makes a new stage. The options are
        checked before anything is built (a Keras model is warmed only once they pass).

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
        :param instances: the stage's instances, one worker each, all fed by the stage's one
            queue (whichever is free takes the next batch): a list of copies of ``func``
            (worker ``i`` calls ``instances[i]``; ``func`` names the stage, and is usually the
            first copy), or a number N: a Keras model is cloned into N copies, each with its
            own runner and warm-up; a plain function is shared by N workers (as
            ``num_workers``, which must agree when both are given).
        :param devices: one device label per instance ("CPU", "GPU:0", ...): a Keras copy is
            built and called under ``tf.device`` of its label (TensorFlow backend); for a plain
            function it is a label for the stats only (the function places itself). Without
            ``instances``, N labels mean N instances.
        :raises ValueError: for invalid options.
        :raises RuntimeError: after the pipe has started (first submit) or closed.
        """
        with self._lock:
            if self._started or self._closed:
                raise RuntimeError(
                    f"pipe {self.name!r} is already running; add() every stage before the first "
                    f"submit() or call, or build a new ModelPipe"
                )
        options = StageOptions(
            func,
            num_workers,
            batch_size,
            filterf,
            batcher,
            timeout,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            preferred_batch_sizes=preferred_batch_sizes,
            adaptive=adaptive,
            latency_objective=latency_objective,
            splitter=splitter,
            name=name,
            linger=linger,
            instances=instances,
            devices=devices,
        )
        if not options.new_stage:
            chain = self._stages[-1].post if self._stages else self._head
            chain.append((options.stage_name, func))
            return self
        stage = Stage(
            options,
            name=self._unique(options.stage_name),
            queue_size=self.queue_size,
            pipe=self.name,
            listeners=self._listeners,
        )
        if options.keras and self._keras_model is None:
            self._keras_model = func
        if self._stages:
            self._stages[-1].next = stage
        self._stages.append(stage)
        return self

    def _unique(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``, ... if a stage has it already."""
        taken = {s.name for s in self._stages}
        unique = name
        for i in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{name}-{i}"
        return unique

    # -- properties ----------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        """The largest ``max_batch_size`` of any batching stage (1 without one)."""
        return max([s.queue.max_batch_size for s in self._stages if s.batching] or [1])

    @property
    def model_stage(self) -> str | None:
        """The name of the served model's stage: the batching stage with the largest
        ``max_batch_size`` (ties: the last), else the last stage; None without stages."""
        if not self._stages:
            return None
        best = self._stages[-1]
        for s in self._stages:
            if s.batching and (
                not best.batching or s.queue.max_batch_size >= best.queue.max_batch_size
            ):
                best = s
        return best.name

    def devices(self, stage: str | None = None) -> tuple[str | None, ...]:
        """One device label per instance of ``stage`` (the model stage by default), in index
        order; None for an instance that was not placed. Its length is the stage's number of
        instances; empty for a pipe without stages.

        :raises KeyError: for an unknown stage name.
        """
        name = stage if stage is not None else self.model_stage
        if name is None:
            return ()
        for s in self._stages:
            if s.name == name:
                return s.devices
        raise KeyError(f"pipe {self.name!r} has no stage {name!r}; its stages: {self.stage_names}")

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
                stage.create_workers()
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
                stage.abort()
            else:
                stage.queue.close()
            for t in stage.threads:
                t.join(remaining())
            if not aborted and any(t.is_alive() for t in stage.threads):
                aborted = True
                for s in self._stages:
                    s.abort()
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
        fut: Future[Any] = Future()
        self._submit(item, key, deadline, False, fut)
        return fut

    def submit_async(
        self, item: Any, *, key: Any = None, deadline: float | None = None, inline: bool = False
    ) -> asyncio.Future[Any]:
        """:meth:`submit` for a coroutine: a future of the running loop.

        The worker completes it on the loop's thread, with every other item of its batch that
        the loop awaits in one hand-off. Call it on the loop's thread; a future the caller
        cancels or completes (say, at its deadline) is skipped.

        :param inline: the caller has no other request in flight for this pipe: if the stage
            is idle and cheap, compute the item here (the future is done on return; see
            :meth:`Stage.run_inline <studioserve.pipelines.stage.Stage.run_inline>`).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._submit(item, key, deadline, False, LoopSlot(fut, completions_for(loop)), inline)
        return fut

    def _submit(
        self,
        item: Any,
        key: Any,
        deadline: float | None,
        block: bool,
        fut: Completion,
        inline: bool = False,
    ) -> None:
        """Run the head functions here and hand the item to the first stage (if any)."""
        if self._closed:
            raise PipeClosed(f"pipe {self.name!r} is closed; it accepts no more items", key=key)
        if not self._started:
            self.start()
        rec = Item(key, item, fut, deadline)
        value = item
        for sname, f in self._head:
            try:
                value = f(value)
            except Exception as e:
                fail_item(rec, item_failed(e, key, sname))
                return
        stage = self._stages[0] if self._stages else None
        if stage is None:
            try:
                fut.set_result(value)
            except InvalidStateError:  # pragma: no cover - nobody else holds it yet
                pass
            with self._lock:
                self._inline_done += 1
            return
        if deadline is not None and _monotonic() > deadline:
            fail_item(rec, expired(key, stage.name, 0.0))
            return
        stage.enter(rec, value, block, inline and len(self._stages) == 1)

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
                max_delay=s.queue.max_delay,
                preferred_batch_sizes=s.queue.preferred_batch_sizes,
                instances=tuple(
                    _instance_stats(i, device, cs[i] if i < len(cs) else Counters())
                    for i, device in enumerate(s.devices)
                ),
            )
        accepted = self._stages[0].queue.accepted if self._stages else self._inline_done
        return PipeStats(stages=stages, in_flight=max(0, accepted - done), accepted=accepted)

    def load(self) -> PipeLoad:
        """How loaded the pipe is now, for admission control (see :class:`PipeLoad`).

        Cheap enough to call per request: a few reads per stage and no lock, so it never
        contends with the workers; the numbers are a snapshot that may be a moment stale.
        """
        stages = self._stages
        if not stages:
            return PipeLoad()
        now = _monotonic()
        expected = oldest = batch = 0.0
        queued = 0
        round_rows = 0
        for s in stages:
            q = s.queue
            ema = q.compute_ema
            per_round = max(1, q.limit * s.num_workers)
            if ema > batch or not round_rows:
                batch = max(batch, ema)
                round_rows = per_round
            n = len(q)
            if not n:
                continue
            queued += n
            rounds = q.queued_rows // per_round
            expected += rounds * ema
            wait = q.oldest_wait(now)
            if wait > oldest:
                oldest = wait
        first = stages[0].queue
        return PipeLoad(
            expected_wait=expected,
            oldest_wait=oldest,
            batch_seconds=batch,
            round_rows=round_rows,
            queued=queued,
            full=len(first) >= first.maxsize,
        )

    # -- Studio.ML's mode (studioml.py) --------------------------------------------------------
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
        return studioml.apply_unordered(self, data)

    def apply_ordered(self, data: Any) -> Any:
        """Like :meth:`apply_unordered`, but a list or generator gives results in input order.

        A list gives a list of results (failed items left out); a generator or other iterable
        gives a generator of results; dicts and sets are as :meth:`apply_unordered`.
        """
        return studioml.apply_ordered(self, data)


def _instance_stats(index: int, device: str | None, c: Counters) -> InstanceStats:
    """One worker's counters as its instance's stats (read without a lock: a snapshot; zeros
    before the pipe starts)."""
    hist = dict(c.hist)
    return InstanceStats(
        index=index,
        device=device,
        batches=c.batches,
        items=c.items,
        rows=sum(k * v for k, v in hist.items()),
        compute_seconds=c.compute,
        failures=c.failures,
    )
