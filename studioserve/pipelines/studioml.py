"""Studio.ML's mode of a pipe: ``pipe(data)`` and ``apply_*`` over a whole collection.

Studio.ML's ModelPipe took a dict, list, set or generator and gave back the same kind of
collection (or a generator) of results. Here those calls stream the items through the same
stages and worker threads as :meth:`~studioserve.pipelines.ModelPipe.submit`: at most a
window of items (a few batches per worker) is in flight, submitted with a wait for room in the
first queue, so a long generator runs in bounded memory. Items that fail are left out and
logged with their key and stage. :class:`~studioserve.pipelines.ModelPipe`'s ``__call__``,
``apply_unordered`` and ``apply_ordered`` delegate to the functions here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any, Protocol

from ..errors import ItemFiltered, PipeClosed
from .events import logger
from .stage import Stage

__all__ = ["Streamable", "apply_ordered", "apply_unordered"]


class Streamable(Protocol):
    """What Studio.ML's mode uses of a pipe (:class:`~studioserve.pipelines.ModelPipe`)."""

    name: str
    queue_size: int
    _stages: list[Stage]

    @property
    def closed(self) -> bool: ...

    @property
    def max_batch_size(self) -> int: ...

    def _submit(
        self, item: Any, key: Any, deadline: float | None, block: bool, fut: Future[Any]
    ) -> None:
        """Send one item in, to complete ``fut``; ``block``: wait for room in the first
        stage's queue."""
        ...


def apply_unordered(pipe: Streamable, data: Any) -> Any:
    """:meth:`ModelPipe.apply_unordered <studioserve.pipelines.ModelPipe.apply_unordered>`."""
    if isinstance(data, dict):
        return dict(_stream(pipe, iter(data.items()), ordered=False))
    if isinstance(data, list):
        return list(_stream(pipe, enumerate(data), ordered=False))
    if isinstance(data, (set, frozenset)):
        return {v for _, v in _stream(pipe, enumerate(data), ordered=False)}
    return _stream(pipe, enumerate(data), ordered=False)


def apply_ordered(pipe: Streamable, data: Any) -> Any:
    """:meth:`ModelPipe.apply_ordered <studioserve.pipelines.ModelPipe.apply_ordered>`."""
    if isinstance(data, dict):
        return dict(_stream(pipe, iter(data.items()), ordered=True))
    if isinstance(data, (set, frozenset)):
        return apply_unordered(pipe, data)
    if isinstance(data, list):
        return [v for _, v in _stream(pipe, enumerate(data), ordered=True)]
    return (v for _, v in _stream(pipe, enumerate(data), ordered=True))


def _window(pipe: Streamable) -> int:
    """How many items a stream keeps in flight: a few batches per worker, within the queue."""
    workers = sum(s.num_workers for s in pipe._stages) or 1
    return max(2, min(pipe.queue_size, 4 * pipe.max_batch_size * workers))


def _stream(
    pipe: Streamable, pairs: Iterator[tuple[Any, Any]], ordered: bool
) -> Iterator[tuple[Any, Any]]:
    """``(key, result)`` of every item that succeeds; raises at once on a closed pipe."""
    if pipe.closed:
        raise PipeClosed(f"pipe {pipe.name!r} is closed; build a new ModelPipe")
    return _stream_gen(pipe, pairs, ordered)


def _stream_gen(
    pipe: Streamable, pairs: Iterator[tuple[Any, Any]], ordered: bool
) -> Generator[tuple[Any, Any], None, None]:
    window = _window(pipe)
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
            fut: Future[Any] = Future()
            pipe._submit(value, key, None, True, fut)
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
            logger.debug("pipe %r: %s", pipe.name, err)
        else:
            stage = getattr(err, "stage", None)
            logger.warning(
                "pipe %r: item %r failed in stage %r and is left out: %s",
                pipe.name,
                key,
                stage,
                err,
            )
