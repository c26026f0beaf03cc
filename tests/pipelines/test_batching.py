"""Batcher alone against its queue, the default stacking/unstacking, and AIMD sizing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from studioserve.errors import PipeClosed
from studioserve.pipelines import AIMDController, Batcher, collate, split_rows
from studioserve.pipelines.batching import BatchRowsError, row_count, split_items


def _fill(b: Batcher[int], items: range | list[int], rows: int = 1) -> None:
    for i in items:
        assert b.put(i, rows)


def _in_thread(target: object) -> threading.Thread:
    t = threading.Thread(target=target, name="test-helper")  # type: ignore[arg-type]
    t.start()
    return t


# -- Batcher --------------------------------------------------------------------------------------


def test_batches_are_cut_at_max_batch_size_in_fifo_order() -> None:
    b: Batcher[int] = Batcher(max_batch_size=4)
    _fill(b, range(10))
    assert b.get_batch() == [0, 1, 2, 3]
    assert b.get_batch() == [4, 5, 6, 7]
    assert b.get_batch() == [8, 9]
    assert len(b) == 0


def test_max_delay_zero_takes_what_is_queued_now() -> None:
    b: Batcher[int] = Batcher(max_batch_size=8, max_delay=0.0)
    b.put(1)
    assert b.get_batch() == [1]


def test_rows_count_toward_the_limit_and_a_large_item_runs_alone() -> None:
    b: Batcher[str] = Batcher(max_batch_size=4)
    b.put("a", 3)
    b.put("b", 2)  # would make 5 rows
    b.put("c", 9)  # larger than the limit on its own
    b.put("d", 1)
    assert b.get_batch() == ["a"]
    assert b.get_batch() == ["b"]
    assert b.get_batch() == ["c"]
    assert b.get_batch() == ["d"]


def test_max_delay_waits_for_the_batch_to_fill() -> None:
    b: Batcher[int] = Batcher(max_batch_size=4, max_delay=3600.0)
    b.put(0)
    got: list[list[int] | None] = []
    waiting = threading.Event()

    def consume() -> None:
        waiting.set()
        got.append(b.get_batch())

    t = _in_thread(consume)
    waiting.wait()
    _fill(b, [1, 2, 3])  # the fourth row wakes the consumer: no timer decides this
    t.join()
    assert got == [[0, 1, 2, 3]]


def test_max_delay_is_cut_short_by_close() -> None:
    b: Batcher[int] = Batcher(max_batch_size=4, max_delay=3600.0)
    b.put(0)
    got: list[list[int] | None] = []
    t = _in_thread(lambda: got.append(b.get_batch()))
    b.close()
    t.join()
    assert got == [[0]]
    assert b.get_batch() is None


def test_two_consumers_waiting_for_one_batch() -> None:
    # both wait out max_delay for the same items; the one that loses must wait again, not fail
    b: Batcher[int] = Batcher(max_batch_size=4, max_delay=3600.0)
    b.put(0)
    got: list[list[int] | None] = []
    threads = [_in_thread(lambda: got.append(b.get_batch())) for _ in range(2)]
    while b._fillers < 2:  # both are inside their max_delay wait
        time.sleep(0.001)
    _fill(b, [1, 2, 3])
    b.put(4)
    b.close()
    for t in threads:
        t.join()
    assert sorted(got, key=len) == [[4], [0, 1, 2, 3]]


def test_preferred_batch_sizes_cut_batches() -> None:
    b: Batcher[int] = Batcher(max_batch_size=8, preferred_batch_sizes=[2, 4])
    _fill(b, range(7))
    assert b.get_batch() == [0, 1, 2, 3]
    assert b.get_batch() == [4, 5]
    assert b.get_batch() == [6]  # no preferred size fits: take what there is


def test_preferred_batch_sizes_end_max_delay_early() -> None:
    b: Batcher[int] = Batcher(max_batch_size=8, max_delay=3600.0, preferred_batch_sizes=[2])
    _fill(b, [0, 1])
    assert b.get_batch() == [0, 1]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(max_batch_size=0)
    with pytest.raises(ValueError, match="max_delay"):
        Batcher(max_delay=-1)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        Batcher(max_batch_size=4, preferred_batch_sizes=[8])
    with pytest.raises(ValueError, match="latency_objective"):
        Batcher(max_batch_size=4, adaptive=True)
    with pytest.raises(ValueError, match="linger"):
        Batcher(max_batch_size=4, linger=2.0)


def test_put_refuses_when_full_and_put_wait_waits_for_room() -> None:
    b: Batcher[int] = Batcher(max_batch_size=2, maxsize=2)
    assert b.put(0)
    assert b.put(1)
    assert not b.put(2)
    assert not b.put_wait(2, timeout=0.0)
    done = threading.Event()

    def produce() -> None:
        b.put_wait(2)
        done.set()

    t = _in_thread(produce)
    assert b.get_batch() == [0, 1]  # makes room
    t.join()
    assert done.is_set()
    assert b.get_batch() == [2]
    assert b.accepted == 3


def test_get_batch_timeout_returns_empty_list() -> None:
    b: Batcher[int] = Batcher()
    assert b.get_batch(timeout=0.0) == []


def test_close_drains_then_returns_none_and_refuses_puts() -> None:
    b: Batcher[int] = Batcher(max_batch_size=2)
    _fill(b, range(3))
    b.close()
    with pytest.raises(PipeClosed):
        b.put(9)
    with pytest.raises(PipeClosed):
        b.put_wait(9)
    assert b.get_batch() == [0, 1]
    assert b.get_batch() == [2]
    assert b.get_batch() is None


def test_close_wakes_a_waiting_consumer() -> None:
    b: Batcher[int] = Batcher()
    got: list[list[int] | None] = [[-1]]
    t = _in_thread(lambda: got.__setitem__(0, b.get_batch()))
    b.close()
    t.join()
    assert got == [None]


def test_abort_returns_what_was_queued() -> None:
    b: Batcher[int] = Batcher()
    _fill(b, range(3))
    assert b.abort() == [0, 1, 2]
    assert b.get_batch() is None


def test_an_idle_stage_never_lingers() -> None:
    # A linger window of an hour would hang this test if an idle stage waited.
    b: Batcher[int] = Batcher(max_batch_size=8, linger=1.0)
    b.compute_ema = 3600.0
    b.put(0)
    assert b.get_batch() == [0]
    b.put(1)
    assert b.get_batch() == [1]


def test_a_busy_stage_collects_items_still_arriving() -> None:
    b: Batcher[int] = Batcher(max_batch_size=4, linger=1.0)
    _fill(b, [0, 1])
    assert b.get_batch() == [0, 1]  # no compute time measured yet: no linger
    b.compute_ema = 3600.0  # the stage is busy now (its last batch had 2 items)
    b.put(2)
    got: list[list[int] | None] = []
    waiting = threading.Event()

    def consume() -> None:
        waiting.set()
        got.append(b.get_batch())

    t = _in_thread(consume)
    waiting.wait()
    _fill(b, [3, 4, 5])  # the batch fills up: the consumer returns at once
    t.join()
    assert got == [[2, 3, 4, 5]]


def test_adaptive_limit_follows_the_controller() -> None:
    b: Batcher[int] = Batcher(max_batch_size=16, adaptive=True, latency_objective=0.01)
    assert b.limit == 4
    b.record(4, 0.001)  # full and fast: grow
    assert b.limit == 5
    b.record(5, 0.5)  # too slow: shrink
    assert b.limit == 3
    _fill(b, range(10))
    assert b.get_batch() == [0, 1, 2]


# -- AIMD -----------------------------------------------------------------------------------------


def test_aimd_grows_additively_only_on_full_batches_and_backs_off() -> None:
    c = AIMDController(max_batch_size=10, latency_objective=1.0, start=2)
    assert c.record(rows=2, seconds=0.5) == 3
    assert c.record(rows=1, seconds=0.5) == 3  # not full: demand, not the model, limited it
    for _ in range(20):
        c.record(rows=c.limit, seconds=0.5)
    assert c.limit == 10  # capped
    assert c.record(rows=10, seconds=2.0) == 7
    assert c.record(rows=7, seconds=2.0) == 5
    c2 = AIMDController(max_batch_size=4, latency_objective=1.0, start=1)
    assert c2.record(rows=1, seconds=5.0) == 1  # never below 1


def test_aimd_validates() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        AIMDController(max_batch_size=0, latency_objective=1.0)
    with pytest.raises(ValueError, match="latency_objective"):
        AIMDController(max_batch_size=4, latency_objective=0)
    with pytest.raises(ValueError, match="backoff"):
        AIMDController(max_batch_size=4, latency_objective=1.0, backoff=1.5)


# -- collate / split ------------------------------------------------------------------------------


def test_collate_concatenates_arrays_and_split_gives_each_item_its_rows() -> None:
    a = np.ones((1, 3))
    b = np.full((2, 3), 2.0)
    c = np.full((3, 3), 3.0)
    (group,) = collate([a, b, c])
    assert group.indices == [0, 1, 2]
    assert group.rows == [1, 2, 3]
    assert group.data.shape == (6, 3)
    parts = split_rows(group.data * 10, group.rows)
    assert [p.shape for p in parts] == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(parts[1], np.full((2, 3), 20.0))


def test_collate_groups_items_that_do_not_stack() -> None:
    values = [np.zeros((1, 3)), np.zeros((1, 4)), np.zeros((2, 3)), np.zeros((1, 3), np.int32)]
    groups = collate(values)
    assert sorted(g.indices for g in groups) == [[0, 2], [1], [3]]


def test_collate_dicts_and_tuples_per_entry() -> None:
    items = [
        {"x": np.zeros((1, 2)), "y": np.ones((1, 1))},
        {"x": np.zeros((2, 2)), "y": np.ones((2, 1))},
    ]
    (g,) = collate(items)
    assert g.rows == [1, 2]
    assert g.data["x"].shape == (3, 2)
    assert g.data["y"].shape == (3, 1)
    pairs = [(np.zeros((1, 2)), np.ones((1, 5))), (np.zeros((1, 2)), np.ones((1, 5)))]
    (t,) = collate(pairs)
    assert isinstance(t.data, tuple)
    assert t.data[1].shape == (2, 5)


def test_collate_other_items_become_a_list() -> None:
    (g,) = collate([1, 2, 3])
    assert g.data == [1, 2, 3]
    assert g.rows is None


def test_split_multi_output_dict_and_list() -> None:
    rows = [1, 2]
    out = {"a": np.arange(3), "b": np.arange(6).reshape(3, 2)}
    parts = split_rows(out, rows)
    assert parts[1]["a"].tolist() == [1, 2]
    assert parts[0]["b"].shape == (1, 2)
    lparts = split_rows([np.arange(3), np.arange(3) * 2], rows)
    assert isinstance(lparts[0], list)
    assert lparts[1][1].tolist() == [2, 4]


def test_split_rejects_wrong_row_counts() -> None:
    with pytest.raises(BatchRowsError) as e:
        split_rows(np.zeros((4, 2)), [2, 3])
    assert (e.value.got, e.value.expected) == (4, 5)
    with pytest.raises(BatchRowsError):
        split_items([1, 2], 3)
    with pytest.raises(BatchRowsError):
        split_items(5, 1)


def test_row_count() -> None:
    assert row_count(np.zeros((5, 2))) == 5
    assert row_count(np.float32(1)) == 1
    assert row_count({"a": np.zeros((3, 1))}) == 3
    assert row_count([np.zeros((2, 1)), np.zeros((2, 4))]) == 2
    assert row_count("text") == 1
