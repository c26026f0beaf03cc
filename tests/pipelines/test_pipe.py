"""ModelPipe in service mode: batching across submitters, failure isolation, overload, close.

Every test that depends on which items share a batch holds the stage's function on a
threading.Event, so batch membership is decided by the test, never by timing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

import studioserve.pipelines as pipelines
from studioserve.errors import (
    BatchSizeMismatch,
    DeadlineExceeded,
    ItemFailed,
    ItemFiltered,
    Overloaded,
    PipeClosed,
    PipelineError,
)
from studioserve.pipelines import BatchEvent, ModelPipe, PipeLoad


class Gate:
    """A stage function that records its calls and holds the first one until released."""

    def __init__(self, func: Callable[[Any], Any] = lambda b: b, hold_first: bool = True) -> None:
        self.func = func
        self.hold_first = hold_first
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[Any] = []
        self.threads: list[str] = []
        self.__name__ = "gate"

    def __call__(self, batch: Any) -> Any:
        self.calls.append(batch)
        self.threads.append(threading.current_thread().name)
        if self.hold_first and len(self.calls) == 1:
            self.entered.set()
            self.release.wait()
        return self.func(batch)


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # never leave a worker blocked


def times10(batch: list[int]) -> list[int]:
    return [x * 10 for x in batch]


def _wait_until(deadline: float) -> None:
    """Let the monotonic clock pass ``deadline`` (how long it takes decides nothing)."""
    while time.monotonic() <= deadline:
        time.sleep(0.001)


# -- batching across submitters ------------------------------------------------------------------


def test_items_queued_while_the_stage_is_busy_share_the_next_call(gate: Gate) -> None:
    gate.func = times10
    with ModelPipe(name="t") as pipe:
        pipe.add(gate, max_batch_size=8, name="m")
        first = pipe.submit(0)
        gate.entered.wait()
        futs = [pipe.submit(i) for i in range(1, 6)]
        gate.release.set()
        assert first.result() == 0
        assert [f.result() for f in futs] == [10, 20, 30, 40, 50]
    assert gate.calls == [[0], [1, 2, 3, 4, 5]]


def test_a_backlog_is_cut_at_max_batch_size(gate: Gate) -> None:
    gate.func = times10
    with ModelPipe() as pipe:
        pipe.add(gate, batch_size=4, linger=0)
        pipe.submit(0)
        gate.entered.wait()
        futs = [pipe.submit(i) for i in range(1, 11)]
        gate.release.set()
        assert [f.result() for f in futs] == [i * 10 for i in range(1, 11)]
    assert [len(c) for c in gate.calls] == [1, 4, 4, 2]


def test_max_delay_waits_after_the_first_item_for_more() -> None:
    calls: list[list[int]] = []

    def f(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        return batch

    with ModelPipe() as pipe:
        # an hour's delay: only a full batch (3 items) can start the call
        pipe.add(f, max_batch_size=3, max_delay=3600.0)
        futs = [pipe.submit(i) for i in range(3)]
        assert [x.result() for x in futs] == [0, 1, 2]
    assert calls == [[0, 1, 2]]


def test_array_items_are_stacked_and_each_gets_its_own_rows(gate: Gate) -> None:
    gate.func = lambda x: x * 2
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=16)
        pipe.submit(np.zeros((1, 3)))
        gate.entered.wait()
        items = [np.full((n, 3), float(n)) for n in (1, 2, 3)]
        futs = [pipe.submit(x) for x in items]
        gate.release.set()
        outs = [f.result() for f in futs]
    assert gate.calls[1].shape == (6, 3)  # one call for all three items
    for x, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)


def test_dict_and_tuple_items_stack_per_entry(gate: Gate) -> None:
    gate.func = lambda d: {"s": d["a"] + d["b"]}
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=16)
        pipe.submit({"a": np.zeros((1, 2)), "b": np.zeros((1, 2))})
        gate.entered.wait()
        futs = [pipe.submit({"a": np.full((n, 2), n), "b": np.ones((n, 2))}) for n in (1, 2)]
        gate.release.set()
        outs = [f.result() for f in futs]
    assert gate.calls[1]["a"].shape == (3, 2)
    assert outs[0]["s"].tolist() == [[2, 2]]
    assert outs[1]["s"].shape == (2, 2)


def test_items_that_do_not_stack_are_called_separately(gate: Gate) -> None:
    gate.func = lambda x: x.sum(axis=1)
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=16)
        pipe.submit(np.zeros((1, 1)))
        gate.entered.wait()
        futs = [pipe.submit(np.ones((1, w))) for w in (2, 3, 2)]
        gate.release.set()
        assert [f.result().tolist() for f in futs] == [[2.0], [3.0], [2.0]]
    assert sorted(c.shape for c in gate.calls[1:]) == [(1, 3), (2, 2)]


def test_custom_batcher_and_splitter() -> None:
    seen: list[Any] = []

    def f(batch: np.ndarray) -> Any:
        seen.append(batch)
        return batch.sum(axis=1)

    def split(out: np.ndarray, rows: list[int]) -> list[float]:
        return [float(v) for v in out]

    with ModelPipe() as pipe:
        pipe.add(f, batch_size=4, batcher=np.vstack, splitter=split)
        assert pipe.apply_ordered([np.ones((1, 2)), np.ones((1, 3)) * 0]) != []
    with ModelPipe() as pipe:
        pipe.add(f, batch_size=4, batcher=lambda items: np.stack(items), splitter=split)
        assert pipe.apply_ordered([np.ones(2), np.ones(2) * 3]) == [2.0, 6.0]


def test_custom_batcher_gets_the_list_of_items() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda b: [sum(x) for x in b], batch_size=8, batcher=lambda items: list(items))
        assert pipe.apply_ordered([[1, 2], [3, 4, 5]]) == [3, 12]


def test_adaptive_limit_grows_on_full_fast_batches(gate: Gate) -> None:
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=16, adaptive=True, latency_objective=3600.0)
        assert pipe.stats().stages["gate"].batch_limit == 4
        pipe.submit(0)
        gate.entered.wait()
        futs = [pipe.submit(i) for i in range(1, 5)]
        gate.release.set()
        for f in futs:
            f.result()
        limit = pipe.stats().stages["gate"].batch_limit
    assert [len(c) for c in gate.calls] == [1, 4]
    assert limit == 5


# -- failure isolation ---------------------------------------------------------------------------


def test_a_batched_call_that_raises_is_bisected_to_the_culprits(gate: Gate) -> None:
    def f(batch: list[int]) -> list[int]:
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return [x + 1 for x in batch]

    gate.func = f
    with ModelPipe(name="iso") as pipe:
        pipe.add(gate, max_batch_size=8, name="model")
        pipe.submit(0)
        gate.entered.wait()
        values = [1, 2, -3, 4, 5, -6, 7, 8]
        futs = [pipe.submit(v, key=f"k{i}") for i, v in enumerate(values)]
        gate.release.set()
        for i, (v, fut) in enumerate(zip(values, futs, strict=True)):
            if v < 0:
                err = fut.exception()
                assert isinstance(err, ItemFailed)
                assert (err.key, err.stage) == (f"k{i}", "model")
                assert isinstance(err.__cause__, ValueError)
                assert f"k{i}" in str(err)
                assert "model" in str(err)
            else:
                assert fut.result() == v + 1
    # the full batch, then halves, quarters and single culprits, never the whole batch again
    assert gate.calls[1] == values
    assert [-3] in gate.calls
    assert [-6] in gate.calls


def test_wrong_number_of_output_rows_fails_every_item_of_that_batch(gate: Gate) -> None:
    gate.func = lambda x: x[:-1]
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=8, name="shrinker")
        first = pipe.submit(np.zeros((1, 2)))
        gate.entered.wait()
        futs = [pipe.submit(np.zeros((n, 2))) for n in (1, 2, 2)]
        gate.release.set()
        errors = [f.exception() for f in futs]
    assert isinstance(first.exception(), BatchSizeMismatch)
    for err in errors:
        assert isinstance(err, BatchSizeMismatch)
        assert err.stage == "shrinker"
        assert "returned 4 rows for 5 input rows" in str(err)
        assert "Hint" in str(err)


def test_wrong_number_of_outputs_for_a_list_batch() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda b: b[1:], batch_size=4)
        err = pipe.submit(3).exception()
    assert isinstance(err, BatchSizeMismatch)
    assert "returned 0 rows for 1 input rows" in str(err)


def test_a_raising_preprocessing_step_fails_only_its_item() -> None:
    def pre(x: int) -> int:
        if x == 2:
            raise KeyError("no such thing")
        return x

    with ModelPipe() as pipe:
        pipe.add(pre).add(times10, batch_size=4)
        futs = [pipe.submit(i, key=i) for i in range(4)]
        err = futs[2].exception()
        assert isinstance(err, ItemFailed)
        assert (err.key, err.stage) == (2, "pre")
        assert isinstance(err.__cause__, KeyError)
        assert [futs[i].result() for i in (0, 1, 3)] == [0, 10, 30]


def test_a_raising_postprocessing_step_names_its_stage() -> None:
    def post(x: int) -> int:
        if x == 10:
            raise RuntimeError("bad row")
        return x

    with ModelPipe() as pipe:
        pipe.add(times10, batch_size=4).add(post)
        futs = [pipe.submit(i) for i in range(3)]
        err = futs[1].exception()
    assert isinstance(err, ItemFailed)
    assert err.stage == "post"
    assert futs[2].result() == 20


def test_a_per_item_stage_failure() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: 1 / x, num_workers=2, name="inv")
        ok, bad = pipe.submit(4), pipe.submit(0, key="zero")
        assert ok.result() == 0.25
        err = bad.exception()
    assert isinstance(err, ItemFailed)
    assert (err.key, err.stage) == ("zero", "inv")
    assert isinstance(err.__cause__, ZeroDivisionError)


def test_filterf_fails_the_item_with_item_filtered() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, batch_size=4, filterf=lambda x: x % 2 == 0, name="even")
        futs = [pipe.submit(i, key=i) for i in range(4)]
        assert futs[0].result() == 0
        assert futs[2].result() == 20
        err = futs[1].exception()
    assert isinstance(err, ItemFiltered)
    assert (err.key, err.stage) == (1, "even")


def test_a_raising_filterf_fails_the_item() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, batch_size=4, filterf=lambda x: 1 / x)
        err = pipe.submit(0).exception()
    assert isinstance(err, ItemFailed)
    assert isinstance(err.__cause__, ZeroDivisionError)


def test_a_stage_may_raise_pipeline_errors_itself() -> None:
    def check(x: int) -> int:
        raise ItemFiltered("not interesting")

    with ModelPipe() as pipe:
        pipe.add(check, num_workers=1, name="chk")
        err = pipe.submit(1, key="a").exception()
    assert isinstance(err, ItemFiltered)
    assert (err.key, err.stage) == ("a", "chk")


# -- overload, deadlines, cancellation -----------------------------------------------------------


def test_a_full_input_queue_raises_overloaded_at_once(gate: Gate) -> None:
    with ModelPipe(queue_size=2) as pipe:
        pipe.add(gate, num_workers=1)
        pipe.submit(0)
        gate.entered.wait()  # the worker holds item 0; the queue is empty
        queued = [pipe.submit(1), pipe.submit(2)]
        with pytest.raises(Overloaded) as e:
            pipe.submit(3, key="late")
        assert e.value.retry_after > 0
        assert e.value.key == "late"
        assert "overloaded" in str(e.value)
        gate.release.set()
        assert [f.result() for f in queued] == [1, 2]


def test_an_item_whose_deadline_passed_while_queued_is_not_computed(gate: Gate) -> None:
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=4, name="m")
        pipe.submit(0)
        gate.entered.wait()
        deadline = time.monotonic() + 0.005
        late = pipe.submit(1, key="late", deadline=deadline)
        fine = pipe.submit(2, deadline=time.monotonic() + 3600)
        _wait_until(deadline)
        gate.release.set()
        err = late.exception()
        assert fine.result() == 2
    assert isinstance(err, DeadlineExceeded)
    assert (err.key, err.stage) == ("late", "m")
    assert [2] in gate.calls
    assert all(1 not in c for c in gate.calls)


def test_a_deadline_already_passed_fails_without_queueing() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, batch_size=4)
        err = pipe.submit(1, deadline=time.monotonic() - 1).exception()
        assert pipe.stats().accepted == 0
    assert isinstance(err, DeadlineExceeded)


def test_submit_timeout_is_a_relative_deadline(gate: Gate) -> None:
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=4, name="m")
        pipe.submit(0)
        gate.entered.wait()
        start = time.monotonic()
        late = pipe.submit(1, key="late", timeout=0.005)
        # the earlier of deadline and timeout wins
        also_late = pipe.submit(3, key="also", deadline=start + 3600, timeout=0.005)
        fine = pipe.submit(2, timeout=3600)
        _wait_until(start + 0.006)
        gate.release.set()
        assert fine.result() == 2
        assert isinstance(late.exception(), DeadlineExceeded)
        assert isinstance(also_late.exception(), DeadlineExceeded)
        with pytest.raises(ValueError, match="timeout"):
            pipe.submit(4, timeout=-1)
    assert all(1 not in c and 3 not in c for c in gate.calls)


def test_pipeline_errors_are_importable_from_the_package() -> None:
    import studioserve.errors as errors
    import studioserve.pipelines as pipelines

    for name in ("Overloaded", "DeadlineExceeded", "PipelineError", "ItemFailed", "PipeClosed"):
        assert getattr(pipelines, name) is getattr(errors, name)


def test_stage_timeout_bounds_the_queue_wait(gate: Gate) -> None:
    with ModelPipe() as pipe:
        # 50 ms: the worker must pick the first item up within it, even on a busy machine
        pipe.add(gate, num_workers=1, timeout=0.05)
        pipe.submit(0)
        assert gate.entered.wait(10)
        waiting = pipe.submit(1)
        _wait_until(time.monotonic() + 0.1)
        gate.release.set()
        assert isinstance(waiting.exception(), DeadlineExceeded)


def test_a_cancelled_future_does_not_disturb_the_others(gate: Gate) -> None:
    with ModelPipe() as pipe:
        pipe.add(gate, max_batch_size=4)
        pipe.submit(0)
        gate.entered.wait()
        cancelled, kept = pipe.submit(1), pipe.submit(2)
        assert cancelled.cancel()
        gate.release.set()
        assert kept.result() == 2
        assert cancelled.cancelled()
        done = pipe.submit(3).result()
    assert done == 3


# -- lifecycle -----------------------------------------------------------------------------------


def _pipe_threads(name: str) -> list[str]:
    return sorted(
        t.name for t in threading.enumerate() if t.name.startswith(f"studioserve-{name}-")
    )


def test_threads_are_named_and_close_joins_every_one() -> None:
    pipe = ModelPipe(name="lc")
    pipe.add(lambda x: x + 1, num_workers=2, name="pre")
    pipe.add(times10, batch_size=4, name="model")
    assert _pipe_threads("lc") == []  # started on first use
    assert pipe.submit(1).result() == 20
    assert _pipe_threads("lc") == [
        "studioserve-lc-model-0",
        "studioserve-lc-pre-0",
        "studioserve-lc-pre-1",
    ]
    pipe.close()
    assert _pipe_threads("lc") == []
    with pytest.raises(PipeClosed):
        pipe.submit(1)
    with pytest.raises(PipeClosed):
        pipe([1, 2])
    pipe.close()  # twice is fine


def test_close_finishes_queued_items(gate: Gate) -> None:
    pipe = ModelPipe(name="drain")
    pipe.add(gate, max_batch_size=2).add(lambda x: x + 1, num_workers=1)
    pipe.submit(0)
    gate.entered.wait()
    futs = [pipe.submit(i) for i in range(1, 6)]
    closer = threading.Thread(target=pipe.close, name="test-closer")
    closer.start()
    gate.release.set()
    closer.join()
    assert [f.result() for f in futs] == [2, 3, 4, 5, 6]
    assert _pipe_threads("drain") == []


def test_close_with_timeout_fails_what_is_still_queued(gate: Gate) -> None:
    pipe = ModelPipe(name="abort")
    pipe.add(gate, num_workers=1)
    stuck = pipe.submit(0)
    gate.entered.wait()
    queued = pipe.submit(1, key="q")
    pipe.close(timeout=0.01)  # the function is still held: give up on the queue
    err = queued.exception()
    assert isinstance(err, PipeClosed)
    assert err.key == "q"
    gate.release.set()
    assert stuck.result() == 0
    for t in threading.enumerate():
        if t.name.startswith("studioserve-abort-"):
            t.join()


def test_a_pipe_is_a_context_manager() -> None:
    with ModelPipe(name="ctx") as pipe:
        pipe.add(times10, batch_size=2)
        assert pipe.submit(2).result() == 20
    assert pipe.closed
    assert _pipe_threads("ctx") == []


def test_add_after_start_is_refused() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, batch_size=2)
        pipe.submit(1).result()
        with pytest.raises(RuntimeError, match="already running"):
            pipe.add(times10)


def test_invalid_options_are_refused() -> None:
    pipe = ModelPipe()
    with pytest.raises(ValueError, match="disagree"):
        pipe.add(times10, batch_size=2, max_batch_size=4)
    with pytest.raises(ValueError, match="max_batch_size"):
        pipe.add(times10, max_batch_size=0)
    with pytest.raises(ValueError, match="adaptive"):
        pipe.add(times10, adaptive=True, latency_objective=1.0)
    with pytest.raises(TypeError):
        pipe.add(42)
    with pytest.raises(ValueError, match="queue_size"):
        ModelPipe(queue_size=0)


# -- composition ---------------------------------------------------------------------------------


def test_plain_adds_compose_without_new_stages_or_threads() -> None:
    where: dict[str, str] = {}

    def pre(x: int) -> int:
        where["pre"] = threading.current_thread().name
        return x + 1

    def post(x: int) -> int:
        where["post"] = threading.current_thread().name
        return x * 2

    with ModelPipe(name="comp") as pipe:
        pipe.add(pre).add(times10, batch_size=4, name="model").add(post).add(lambda x: x - 1)
        assert pipe.stage_names == ["model"]
        assert pipe.submit(1).result() == 39
    assert where["pre"] == threading.current_thread().name  # the submitting thread
    assert where["post"] == "studioserve-comp-model-0"


def test_a_pipe_without_stages_runs_inline() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x + 1).add(lambda x: x * 3)
        fut = pipe.submit(1)
        assert fut.done()
        assert fut.result() == 6
        assert pipe.stage_names == []
        assert pipe.stats().in_flight == 0


def test_max_batch_size_and_keras_model_properties() -> None:
    pipe = ModelPipe()
    assert pipe.max_batch_size == 1
    pipe.add(lambda x: x, num_workers=2)
    pipe.add(times10, batch_size=8)
    pipe.add(times10, max_batch_size=32)
    assert pipe.max_batch_size == 32
    assert pipe.keras_model is None
    assert "ModelPipe" in repr(pipe)
    pipe.close()


def test_batch_size_one_is_a_per_item_stage() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * 2, batch_size=1)
        assert pipe.apply_ordered([1, 2, 3]) == [2, 4, 6]
        assert pipe.stats().stages["lambda"].batching is False


# -- observability -------------------------------------------------------------------------------


def test_listeners_hear_every_batch_and_a_raising_one_is_ignored(
    gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[BatchEvent] = []

    def bad(event: BatchEvent) -> None:
        raise RuntimeError("listener bug")

    with ModelPipe(name="obs") as pipe:
        pipe.add(gate, max_batch_size=8, name="m")
        pipe.add_listener(bad)
        pipe.add_listener(events.append)
        with caplog.at_level(logging.ERROR, logger="studioserve.pipelines.pipe"):
            pipe.submit(0)
            gate.entered.wait()
            futs = [pipe.submit(np.ones((n, 2))) for n in (1, 2)]
            gate.release.set()
            for f in futs:
                f.result()
        pipe.remove_listener(bad)
    assert [(e.stage, e.size, e.ok, e.failed) for e in events] == [("m", 1, 1, 0), ("m", 2, 2, 0)]
    assert events[1].rows == 3
    assert len(events[1].queue_waits) == 2
    assert events[1].compute_seconds >= 0
    assert "listener" in caplog.text


def test_stats_count_items_batches_failures_and_in_flight(gate: Gate) -> None:
    gate.func = lambda b: [1 // x for x in b]
    with ModelPipe(name="st") as pipe:
        pipe.add(gate, max_batch_size=8, name="m")
        pipe.submit(1)
        gate.entered.wait()
        futs = [pipe.submit(x) for x in (1, 0, 1)]
        during = pipe.stats()
        gate.release.set()
        for f in futs:
            f.exception()
        after = pipe.stats()
    assert during.in_flight == 4
    assert during.stages["m"].queue_depth == 3
    st = after.stages["m"]
    assert after.in_flight == 0
    assert after.accepted == 4
    assert st.items == 4
    assert st.failures == 1
    assert st.batch_sizes == {1: 1, 3: 1}
    assert st.batches == 2
    assert st.compute_seconds > 0
    assert st.queue_wait_seconds > 0
    assert st.workers == 1
    assert st.batching
    assert st.max_batch_size == 8


def test_load_of_an_idle_pipe_and_of_one_without_stages_is_zero() -> None:
    with ModelPipe() as pipe:
        pipe.add(times10, max_batch_size=4, num_workers=2)
        assert pipe.load() == PipeLoad(round_rows=8)  # 4 rows a batch, 2 workers
        assert pipe.submit(1).result() == 10
        idle = pipe.load()
    assert (idle.expected_wait, idle.oldest_wait, idle.queued, idle.full) == (0.0, 0.0, 0, False)
    assert idle.batch_seconds > 0  # measured by the batch that ran
    assert idle.round_rows == 8
    with ModelPipe() as inline:
        inline.add(lambda x: x + 1)
        assert inline.submit(1).result() == 2
        assert inline.load() == PipeLoad()


def test_load_reports_whole_batches_queued_ahead_and_the_oldest_wait() -> None:
    entered, permits = threading.Event(), threading.Semaphore(0)

    def held(batch: list[int]) -> list[int]:
        entered.set()
        assert permits.acquire(timeout=10)
        return batch

    with ModelPipe(queue_size=7) as pipe:
        pipe.add(held, max_batch_size=2, name="m")
        first = pipe.submit(0)
        assert entered.wait(10)  # the worker holds [0]
        futs = [pipe.submit(i) for i in range(1, 8)]  # 7 queued: the queue is full
        full = pipe.load()
        assert (full.queued, full.full, full.batch_seconds) == (7, True, 0.0)
        assert full.expected_wait == 0.0  # nothing measured yet
        assert full.oldest_wait > 0
        time.sleep(0.1)
        permits.release()  # [0] took >= 0.1 s; the worker takes [1, 2] and holds it
        assert first.result(10) == 0
        load = pipe.load()
        for _ in range(1000):  # bounded: until the worker has taken its next batch
            if load.queued == 5:
                break
            time.sleep(0.005)
            load = pipe.load()
        assert load.queued == 5
        assert not load.full
        assert load.round_rows == 2
        assert load.batch_seconds >= 0.1
        # 5 rows queued, 2 per batch: two whole batches ahead of a new item
        assert load.expected_wait == pytest.approx(2 * load.batch_seconds)
        assert load.oldest_wait >= 0.1
        permits.release(10)
        assert [f.result(10) for f in futs] == list(range(1, 8))
    assert pipe.load().queued == 0


def test_public_names() -> None:
    assert set(pipelines.__all__) == {
        "AIMDController",
        "BatchEvent",
        "BatchSizeMismatch",
        "Batcher",
        "DeadlineExceeded",
        "InstanceStats",
        "InvalidInput",
        "ItemFailed",
        "ItemFiltered",
        "ModelPipe",
        "Overloaded",
        "PipeClosed",
        "PipelineError",
        "PipeLoad",
        "PipeStats",
        "StageStats",
        "collate",
        "split_rows",
    }
    for name in pipelines.__all__:
        assert getattr(pipelines, name) is not None


def test_many_concurrent_submitters_all_get_their_own_results() -> None:
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def submitter(i: int) -> None:
        try:
            for j in range(20):
                v = np.full((1, 2), i * 100 + j, dtype=np.float64)
                out = pipe.submit(v).result()
                assert out[0, 0] == (i * 100 + j) * 3
            results[i] = True
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with ModelPipe(name="many") as pipe:
        pipe.add(lambda x: x * 3, max_batch_size=16)
        threads = [
            threading.Thread(target=submitter, args=(i,), name=f"sub-{i}") for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) == 16


def test_future_type_and_errors_are_pipeline_errors() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda b: 1 / 0, batch_size=2)
        fut = pipe.submit(1)
        assert isinstance(fut, Future)
        assert isinstance(fut.exception(), PipelineError)


def test_a_batching_stage_with_several_workers() -> None:
    with ModelPipe(name="mw") as pipe:
        pipe.add(times10, batch_size=4, num_workers=3, max_delay=0.001)
        assert pipe.apply_ordered(list(range(200))) == [i * 10 for i in range(200)]
        assert _pipe_threads("mw") == [f"studioserve-mw-times10-{i}" for i in range(3)]
