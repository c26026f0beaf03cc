"""Futures an asyncio loop awaits, completed by the pipe's worker threads in bulk.

A coroutine that submits an item (:meth:`ModelPipe.submit_async
<studioserve.pipelines.ModelPipe.submit_async>`) gets an :class:`asyncio.Future` of its loop;
the item carries a :class:`LoopSlot` in its place, which the worker completes as it would a
:class:`concurrent.futures.Future` (``set_result``, ``set_exception``, ``cancelled``). An
asyncio future may only be completed on its loop's thread, so the slot hands the result to
its loop's :class:`LoopCompletions`: an append to a deque, and one
``loop.call_soon_threadsafe`` for every burst of completions, not one per item. A worker that
completes a batch of 64 items wakes the loop once, and the loop completes the 64 futures in
one callback.

Why this is exact without a lock: the worker appends a completion *before* it reads the
``scheduled`` flag, and the loop clears the flag *before* it empties the deque, so a
completion is either seen by a callback already scheduled or schedules the next one.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Callable
from threading import get_ident
from time import monotonic
from typing import Any, Generic, TypeVar

__all__ = ["DeadlineWatch", "LoopCompletions", "LoopSlot", "completions_for", "deadline_watch"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _PerLoop(Generic[_T]):
    """One object per event loop, made on first use (on the loop's thread); the last one
    looked up is kept at hand, as a server runs one loop."""

    __slots__ = ("_by_loop", "_last", "_make")

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], _T]) -> None:
        self._make = make
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _T] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[asyncio.AbstractEventLoop, _T] | None = None

    def get(self, loop: asyncio.AbstractEventLoop) -> _T:
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        found = self._by_loop.get(loop)
        if found is None:
            found = self._by_loop.setdefault(loop, self._make(loop))
        self._last = (loop, found)
        return found


class LoopCompletions:
    """The completions waiting for one loop (one per loop: :func:`completions_for`)."""

    __slots__ = ("__weakref__", "_loop", "_pending", "_scheduled", "_thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: int) -> None:
        self._loop = loop
        self._thread = thread
        self._pending: deque[tuple[asyncio.Future[Any], Any, bool]] = deque()
        self._scheduled = False

    def add(self, future: asyncio.Future[Any], value: Any, ok: bool) -> None:
        """Complete ``future`` on its loop (any thread): with ``value``, or raise it (not ok).

        On the loop's own thread (an item computed inline) it is completed at once."""
        if get_ident() == self._thread:
            if not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            return
        self._pending.append((future, value, ok))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody awaits these any more
                self._pending.clear()

    def _deliver(self) -> None:
        self._scheduled = False
        pending = self._pending
        while pending:
            future, value, ok = pending.popleft()
            if future.done():  # cancelled, or failed by the request's deadline
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def completions_for(loop: asyncio.AbstractEventLoop) -> LoopCompletions:
    """The one :class:`LoopCompletions` of ``loop`` (made on first use; call it on the loop's
    thread)."""
    return _COMPLETIONS.get(loop)


_COMPLETIONS: _PerLoop[LoopCompletions] = _PerLoop(lambda loop: LoopCompletions(loop, get_ident()))


class LoopSlot:
    """What an item carries instead of a concurrent future when a coroutine awaits it.

    :param future: the loop's future the coroutine awaits.
    :param completions: that loop's completions.
    """

    __slots__ = ("_completions", "future")

    def __init__(self, future: asyncio.Future[Any], completions: LoopCompletions) -> None:
        self.future = future
        self._completions = completions

    def set_result(self, value: Any) -> None:
        self._completions.add(self.future, value, True)

    def set_exception(self, error: BaseException) -> None:
        self._completions.add(self.future, error, False)

    def cancelled(self) -> bool:
        """Whether its owner gave up (read from the worker: a plain attribute read)."""
        return self.future.done()


class DeadlineWatch:
    """Fails the futures a loop awaits once their deadline passes, with one timer for all.

    A timer per request costs the loop a heap push, a cancel and the heap's comparisons (in
    Python) for every request; this keeps the waiting requests in a dict and looks at them
    every :attr:`TICK` seconds while any waits, so a request times out at most a tick late.
    Call its methods on the loop's thread.
    """

    #: seconds between looks at the waiting requests
    TICK = 0.025

    __slots__ = ("__weakref__", "_loop", "_next", "_timer", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, deadline: float, expire: Callable[[], None]) -> int:
        """Call ``expire()`` once ``time.monotonic()`` passes ``deadline`` unless
        :meth:`discard` is called first; returns the token for :meth:`discard`."""
        self._next += 1
        token = self._next
        self._waiting[token] = (deadline, expire)
        if self._timer is None:
            self._timer = self._loop.call_later(self.TICK, self._tick)
        return token

    def discard(self, token: int) -> None:
        self._waiting.pop(token, None)

    def _tick(self) -> None:
        self._timer = None
        now = monotonic()
        waiting = self._waiting
        late = [t for t, (deadline, _) in waiting.items() if deadline <= now]
        for token in late:
            _, expire = waiting.pop(token)
            try:
                expire()
            except Exception:  # pragma: no cover - expire only completes futures
                logger.exception("a request's deadline callback failed")
        if waiting:
            self._timer = self._loop.call_later(self.TICK, self._tick)


_WATCHES: _PerLoop[DeadlineWatch] = _PerLoop(DeadlineWatch)


def deadline_watch(loop: asyncio.AbstractEventLoop) -> DeadlineWatch:
    """The one :class:`DeadlineWatch` of ``loop`` (made on first use)."""
    return _WATCHES.get(loop)
