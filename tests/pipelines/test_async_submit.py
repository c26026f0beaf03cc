"""ModelPipe.submit_async: futures of an asyncio loop, completed a batch per hand-off, and the
inline computation of a lone item on an idle, cheap stage."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ItemFailed
from studioserve.pipelines import ModelPipe
from studioserve.pipelines import stage as stage_module
from studioserve.pipelines.completion import LoopCompletions, completions_for


def _pipe(fn: Any = None, **options: Any) -> ModelPipe:
    pipe = ModelPipe(name="t")
    pipe.add(fn or (lambda b: b * 2), max_batch_size=64, name="model", **options)
    pipe.start()
    return pipe


def _measure(pipe: ModelPipe) -> None:
    """A few batches through the worker, so the stage has a measured batch time."""
    for _ in range(3):
        pipe.submit(np.ones(2)).result(5)


def test_results_arrive_on_the_loop_and_a_batch_wakes_it_once() -> None:
    gate = threading.Event()

    def fn(b: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return b * 2

    pipe = _pipe(fn)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*a: Any, **k: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(*a, **k)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        first = pipe.submit_async(np.zeros(2), key="first")  # the worker takes it, then waits
        await asyncio.sleep(0.05)
        rest = [pipe.submit_async(np.full(2, i), key=i) for i in range(40)]
        gate.set()
        out = await asyncio.gather(first, *rest)
        assert wakeups <= 3, wakeups  # two batches: one hand-off each (not 41)
        return out

    try:
        out = asyncio.run(main())
    finally:
        pipe.close()
    np.testing.assert_array_equal(out[0], np.zeros(2))
    for i, got in enumerate(out[1:]):
        np.testing.assert_array_equal(got, np.full(2, 2 * i))


def test_a_lone_item_on_an_idle_cheap_stage_is_computed_in_the_calling_thread() -> None:
    ran_on: list[str] = []

    def fn(b: np.ndarray) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        return b + 1

    pipe = _pipe(fn)
    _measure(pipe)

    async def main() -> None:
        ran_on.clear()
        fut = pipe.submit_async(np.ones(2), inline=True)
        assert fut.done()  # computed before submit_async returned
        np.testing.assert_array_equal(await fut, np.full(2, 2.0))
        assert ran_on == [threading.current_thread().name]
        fut = pipe.submit_async(np.ones(2))  # not asked: the worker computes it
        np.testing.assert_array_equal(await fut, np.full(2, 2.0))
        assert ran_on[-1].startswith("studioserve-t-model")

    try:
        before = pipe.stats().stages["model"]
        asyncio.run(main())
        after = pipe.stats().stages["model"]
    finally:
        pipe.close()
    assert after.items - before.items == 2
    assert after.batches - before.batches == 2


def test_an_inline_item_that_fails_fails_alone() -> None:
    def fn(b: np.ndarray) -> np.ndarray:
        if b[0] < 0:
            raise ValueError("negative")
        return b

    pipe = _pipe(fn)
    _measure(pipe)

    async def main() -> None:
        fut = pipe.submit_async(-np.ones(2), key="bad", inline=True)
        assert fut.done()
        with pytest.raises(ItemFailed, match="negative"):
            await fut
        np.testing.assert_array_equal(await pipe.submit_async(np.ones(2), inline=True), np.ones(2))

    try:
        asyncio.run(main())
    finally:
        pipe.close()


@pytest.mark.parametrize("why", ["max_delay", "slow", "busy", "unmeasured"])
def test_no_inline_computation_unless_idle_cheap_and_measured(why: str) -> None:
    gate = threading.Event()
    gate.set()

    def fn(b: np.ndarray) -> np.ndarray:
        gate.wait(5)
        if why == "slow":
            time.sleep(stage_module.INLINE_MAX_SECONDS * 2)
        return b

    pipe = _pipe(fn, max_delay=0.001 if why == "max_delay" else 0.0)
    if why != "unmeasured":
        _measure(pipe)

    async def main() -> None:
        if why == "busy":
            gate.clear()
            held = pipe.submit_async(np.ones(2), key="held")
            await asyncio.sleep(0.05)  # the worker is computing it now
        fut = pipe.submit_async(np.ones(2), inline=True)
        assert not fut.done()
        gate.set()
        await fut
        if why == "busy":
            await held

    try:
        asyncio.run(main())
    finally:
        pipe.close()


def test_completions_skip_futures_already_done_and_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    done = loop.create_future()
    done.cancel()
    live = loop.create_future()
    c = LoopCompletions(loop, -1)  # "another thread": every completion is handed over
    c.add(done, 1, True)
    c.add(live, 2, True)
    loop.run_until_complete(asyncio.sleep(0))
    assert live.result() == 2
    loop.close()
    c.add(done, 3, True)  # a closed loop: dropped, no error


def test_one_completions_object_per_loop() -> None:
    async def main() -> LoopCompletions:
        loop = asyncio.get_running_loop()
        assert completions_for(loop) is completions_for(loop)
        return completions_for(loop)

    assert asyncio.run(main()) is not asyncio.run(main())
