"""Instances (Triton's instance groups): one stage, one queue, a copy of its function per worker.

Which copy takes a batch is decided by the test: every copy holds its batch on a
threading.Event until released, and the next item is submitted only once a copy has taken the
one before, so batch membership and placement never depend on timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from studioserve.errors import ItemFailed
from studioserve.pipelines import BatchEvent, InstanceStats, ModelPipe

WAIT = 10.0  # seconds any wait in these tests may take before it counts as a failure


class Copies:
    """N copies of a batched function (``rows * 10``), each holding its batches until released.

    Copy ``i`` sets ``entered[i]`` when it takes a batch and blocks until ``release`` is set;
    a copy listed in ``broken`` raises instead of answering once released.
    """

    def __init__(self, n: int, *, broken: tuple[int, ...] = (), hold: bool = True) -> None:
        self.entered = [threading.Event() for _ in range(n)]
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.broken = broken
        self.batches: list[list[int]] = [[] for _ in range(n)]
        self._lock = threading.Lock()
        self.funcs = [self._copy(i) for i in range(n)]

    def _copy(self, i: int) -> Any:
        def copy(batch: np.ndarray) -> np.ndarray:
            with self._lock:
                self.batches[i].append(len(batch))
            self.entered[i].set()
            assert self.release.wait(WAIT), "the test never released the copies"
            if i in self.broken:
                raise RuntimeError(f"copy {i} is broken")
            return batch * 10

        copy.__name__ = "model"
        return copy

    def wait_any_new(self, taken: set[int]) -> int:
        """The copy, not in ``taken``, that entered (waits until one has)."""
        for _ in range(int(WAIT / 0.01)):
            for i, ev in enumerate(self.entered):
                if i not in taken and ev.is_set():
                    return i
            threading.Event().wait(0.01)
        raise AssertionError(f"no copy besides {sorted(taken)} took a batch")


@pytest.fixture
def copies() -> Iterator[Copies]:
    c = Copies(2)
    yield c
    c.release.set()  # never leave a worker blocked


def _row(v: int) -> np.ndarray:
    return np.array([[v]], dtype=np.int64)


def test_two_instances_run_two_batches_at_once(copies: Copies) -> None:
    events: list[BatchEvent] = []
    with ModelPipe(name="inst") as pipe:
        pipe.add(copies.funcs[0], max_batch_size=4, instances=copies.funcs, name="model")
        pipe.add_listener(events.append)
        first = pipe.submit(_row(1))
        a = copies.wait_any_new(set())
        second = pipe.submit(_row(2))
        b = copies.wait_any_new({a})
        # both copies are inside their function now, neither released: two batches in flight
        assert {a, b} == {0, 1}
        assert not first.done()
        assert not second.done()
        assert pipe.stats().in_flight == 2
        copies.release.set()
        np.testing.assert_array_equal(first.result(WAIT), [[10]])
        np.testing.assert_array_equal(second.result(WAIT), [[20]])
        st = pipe.stats().stages["model"]
    assert copies.batches == [[1], [1]]
    assert st.workers == 2
    assert [(i.index, i.device, i.batches, i.items, i.rows, i.failures) for i in st.instances] == [
        (0, None, 1, 1, 1, 0),
        (1, None, 1, 1, 1, 0),
    ]
    assert all(i.compute_seconds > 0 for i in st.instances)
    assert sorted(e.instance for e in events) == [0, 1]
    assert {e.instance: e.rows for e in events} == {a: 1, b: 1}


def test_per_instance_counts_sum_to_the_stage_totals() -> None:
    c = Copies(3, hold=False)
    events: list[BatchEvent] = []
    with ModelPipe(name="sums") as pipe:
        pipe.add(c.funcs[0], max_batch_size=4, instances=c.funcs, name="model")
        pipe.add_listener(events.append)
        futs = [pipe.submit(np.full((1 + i % 2, 1), i)) for i in range(60)]
        for i, f in enumerate(futs):
            np.testing.assert_array_equal(f.result(WAIT), np.full((1 + i % 2, 1), i * 10))
        st = pipe.stats().stages["model"]
    assert len(st.instances) == 3
    assert sum(i.items for i in st.instances) == st.items == 60
    assert sum(i.batches for i in st.instances) == st.batches == len(events)
    assert sum(i.rows for i in st.instances) == sum(k * v for k, v in st.batch_sizes.items()) == 90
    assert sum(i.compute_seconds for i in st.instances) == pytest.approx(st.compute_seconds)
    assert sum(i.failures for i in st.instances) == st.failures == 0
    for inst in st.instances:  # each instance's count is what its copy and its events saw
        assert inst.batches == len(c.batches[inst.index])
        assert inst.rows == sum(c.batches[inst.index])
        assert inst.batches == sum(1 for e in events if e.instance == inst.index)


def test_a_broken_instance_fails_only_the_items_of_its_batches() -> None:
    c = Copies(2, broken=(0,))
    try:
        with ModelPipe(name="broken") as pipe:
            pipe.add(c.funcs[0], max_batch_size=4, instances=c.funcs, name="model")
            f1 = pipe.submit(_row(1), key="one")
            a = c.wait_any_new(set())
            f2 = pipe.submit(_row(2), key="two")
            c.wait_any_new({a})
            c.release.set()
            bad, good = (f1, f2) if a == 0 else (f2, f1)
            err = bad.exception(WAIT)
            assert isinstance(err, ItemFailed)
            assert err.stage == "model"
            assert "copy 0 is broken" in str(err)
            assert good.result(WAIT).tolist() in ([[10]], [[20]])
            more = [pipe.submit(_row(3)) for _ in range(4)]  # the healthy copy keeps serving
            outcomes = [f.exception(WAIT) for f in more]
            st = pipe.stats().stages["model"]
    finally:
        c.release.set()
    assert st.failures == 1 + sum(e is not None for e in outcomes)
    assert st.instances[0].failures == st.failures  # every failure is the broken copy's
    assert st.instances[1].failures == 0
    assert st.instances[1].items == 1 + sum(e is None for e in outcomes)


def test_close_joins_every_instance() -> None:
    c = Copies(3, hold=False)
    pipe = ModelPipe(name="joins")
    pipe.add(c.funcs[0], max_batch_size=2, instances=c.funcs, name="model")
    assert pipe.submit(_row(1)).result(WAIT).tolist() == [[10]]
    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("studioserve-joins-"))
    assert names == [f"studioserve-joins-model-{i}" for i in range(3)]
    pipe.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("studioserve-joins-")]


def test_one_instance_is_the_stage_as_before() -> None:
    events: list[BatchEvent] = []

    def times10(batch: np.ndarray) -> np.ndarray:
        return batch * 10

    with ModelPipe() as plain, ModelPipe() as one:
        plain.add(times10, max_batch_size=4, name="m")
        one.add(times10, max_batch_size=4, name="m", instances=1)
        one.add_listener(events.append)
        for pipe in (plain, one):
            assert pipe.submit(_row(2)).result(WAIT).tolist() == [[20]]
            assert pipe.devices() == (None,)
        a, b = plain.stats().stages["m"], one.stats().stages["m"]
    assert events[0].instance == 0
    for st in (a, b):
        assert (st.workers, st.items, st.batches, st.batch_sizes) == (1, 1, 1, {1: 1})
        assert [(i.index, i.device, i.items) for i in st.instances] == [(0, None, 1)]
    # num_workers alone: one function shared by N workers, still N instances in the stats
    with ModelPipe() as shared:
        shared.add(times10, max_batch_size=4, num_workers=3, name="m")
        assert [i.index for i in shared.stats().stages["m"].instances] == [0, 1, 2]


def test_instances_and_devices_set_the_workers_and_the_labels() -> None:
    def times10(batch: Any) -> Any:
        return batch * 10

    with ModelPipe() as pipe:
        pipe.add(times10, max_batch_size=4, name="pre", instances=2)  # one function, shared
        pipe.add(times10, max_batch_size=8, name="m", devices=["GPU:0", "GPU:1"])
        assert pipe.devices() == ("GPU:0", "GPU:1")  # the model stage's
        assert pipe.devices("pre") == (None, None)
        assert pipe.submit(_row(1)).result(WAIT).tolist() == [[100]]
        stages = pipe.stats().stages
        with pytest.raises(KeyError, match="no stage 'nope'"):
            pipe.devices("nope")
    assert stages["pre"].workers == 2
    assert [i.device for i in stages["m"].instances] == ["GPU:0", "GPU:1"]
    assert ModelPipe().devices() == ()
    before_start = ModelPipe().add(times10, max_batch_size=2, instances=[times10, times10])
    assert [i.items for i in before_start.stats().stages["times10"].instances] == [0, 0]
    assert InstanceStats(0, None, 0, 0, 0, 0.0, 0).device is None


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"instances": 0}, ValueError, "instances must be >= 1"),
        ({"instances": []}, ValueError, "empty list"),
        ({"instances": "ab"}, TypeError, "instances must be a number"),
        ({"instances": True}, TypeError, "instances must be a number"),
        ({"instances": [abs, 3]}, TypeError, r"instances\[1\] is a int"),
        ({"instances": 2, "num_workers": 3}, ValueError, "num_workers=3 and 2 instances"),
        ({"instances": 2, "devices": ["CPU"]}, ValueError, "1 labels for 2 instances"),
        ({"devices": "GPU:0"}, TypeError, "devices must be a list"),
        ({"instances": 1, "devices": [""]}, ValueError, "non-empty strings"),
    ],
)
def test_bad_instances_are_refused_before_anything_is_built(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    pipe = ModelPipe()
    with pytest.raises(error, match=match):
        pipe.add(abs, max_batch_size=4, **options)
    assert pipe.stage_names == []
