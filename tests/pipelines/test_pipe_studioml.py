"""Studio.ML's ModelPipe behaviours (its tests/model_util_test.py), on our API.

Studio.ML ran batches through module functions (_q2q_batch, _gen2q, _q2gen) with a worker
that gave up after ``timeout`` seconds without input; here the same behaviours go through a
Batcher and a long-lived ModelPipe. Several of Studio.ML's own tests were skipped there
("ordering problem", "fails in python3.6"); they run here.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator

import numpy as np
import pytest

from studioserve.pipelines import Batcher, ModelPipe


def squares(batch: list[int]) -> list[int]:
    return [x * x for x in batch]


# -- q2q batching, filtering, generators -----------------------------------------------------------


def test_q2q_batch() -> None:
    data = range(10)
    q: Batcher[int] = Batcher(max_batch_size=4)
    for d in data:
        q.put(d)
    q.close()
    out: list[int] = []
    while (batch := q.get_batch()) is not None:
        assert len(batch) <= 4
        out.extend(squares(batch))
    assert out == [x * x for x in data]


def test_q2q_batch_through_a_pipe() -> None:
    with ModelPipe() as pipe:
        pipe.add(squares, batch_size=4)
        assert pipe.apply_ordered(list(range(10))) == [x * x for x in range(10)]
        assert max(pipe.stats().stages["squares"].batch_sizes) <= 4


def test_q2q_batch_filter() -> None:
    with ModelPipe() as pipe:
        pipe.add(squares, batch_size=4, filterf=lambda x: x != 3)
        assert pipe.apply_ordered(list(range(10))) == [x * x for x in range(10) if x != 3]


def test_gen2q_q2gen_streams_a_generator() -> None:
    consumed: list[int] = []

    def gen() -> Iterator[int]:
        for x in range(10):
            consumed.append(x)
            yield x

    with ModelPipe() as pipe:
        pipe.add(lambda x: x, num_workers=2)
        out = pipe(gen())
        assert isinstance(out, types.GeneratorType)
        assert consumed == []  # lazy: nothing read before the output is consumed
        pairs = list(out)
    assert sorted(pairs) == [(i, i) for i in range(10)]


# -- BufferedPipe tests ----------------------------------------------------------------------------


def test_pipe_simple() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x + 1).add(lambda x: x * x)
        assert list(pipe.apply_ordered(x for x in range(1, 5))) == [4, 9, 16, 25]


def test_pipe_buffer() -> None:
    # skipped in Studio.ML ("ordering problem"): 32 workers, results still in input order
    with ModelPipe() as pipe:
        pipe.add(lambda x: x + 1, num_workers=32).add(lambda x: x * x)
        out = pipe.apply_ordered(x for x in range(1, 5))
        assert isinstance(out, types.GeneratorType)
        assert list(out) == [4, 9, 16, 25]


# -- ModelPipe tests -------------------------------------------------------------------------------


def test_model_pipe_dict() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * x, num_workers=32)
        input_dict = {x: x for x in range(10)}
        assert pipe(input_dict) == {k: v * v for k, v in input_dict.items()}


def test_model_pipe_long() -> None:
    # skipped in Studio.ML ("fails in python3.6"); smaller here to keep the suite quick
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * x, num_workers=32, timeout=30)
        input_dict = {x: x for x in range(2000)}
        assert pipe(input_dict) == {k: v * v for k, v in input_dict.items()}


def test_model_pipe_ordered() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * x, num_workers=32)
        assert pipe.apply_ordered(list(range(10))) == [x * x for x in range(10)]


def test_model_pipe_batch() -> None:
    with ModelPipe() as pipe:
        pipe.add(squares, batch_size=4)
        assert pipe.apply_ordered(list(range(10))) == [x * x for x in range(10)]


def test_model_pipe_exception(caplog: pytest.LogCaptureFixture) -> None:
    # Studio.ML gave None for the failed item; we leave it out and log its key and stage
    with ModelPipe() as pipe:
        pipe.add(lambda x: 1.0 / x, num_workers=4, name="inverse")
        inputs = list(range(-10, 10))
        with caplog.at_level(logging.WARNING, logger="studioserve.pipelines.pipe"):
            out = pipe.apply_ordered(inputs)
    assert out == [1.0 / x for x in inputs if x != 0]
    failed = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(failed) == 1
    assert "10" in failed[0].getMessage()
    assert "inverse" in failed[0].getMessage()


def test_model_pipe_exception_in_a_dict_keeps_the_other_keys() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: 1.0 / x, num_workers=2)
        assert pipe({"a": 2, "b": 0, "c": 4}) == {"a": 0.5, "c": 0.25}


# -- the shapes of pipe(data) ----------------------------------------------------------------------


def test_apply_unordered_shapes() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * 2, num_workers=3)
        pairs = pipe([1, 2, 3])
        assert isinstance(pairs, list)
        assert sorted(pairs) == [(0, 2), (1, 4), (2, 6)]  # (index, result), completion order
        assert pipe({1, 2, 3}) == {2, 4, 6}
        assert pipe({"x": 5}) == {"x": 10}
        gen = pipe(x for x in [7])
        assert isinstance(gen, types.GeneratorType)
        assert list(gen) == [(0, 14)]
        assert sorted(pipe(range(3))) == [(0, 0), (1, 2), (2, 4)]


def test_apply_ordered_shapes() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x * 2, num_workers=3)
        assert pipe.apply_ordered([3, 1, 2]) == [6, 2, 4]
        assert pipe.apply_ordered({"a": 1}) == {"a": 2}
        assert pipe.apply_ordered({1, 2}) == {2, 4}
        assert list(pipe.apply_ordered(x for x in [3, 1])) == [6, 2]


def test_a_long_generator_is_streamed_with_bounded_queues() -> None:
    with ModelPipe(queue_size=4) as pipe:
        pipe.add(squares, batch_size=2)
        out = pipe.apply_ordered(x for x in range(500))
        assert list(out) == [x * x for x in range(500)]


def test_apply_on_a_pipe_without_stages() -> None:
    with ModelPipe() as pipe:
        pipe.add(lambda x: x + 1)
        assert pipe.apply_ordered([1, 2]) == [2, 3]
        assert pipe({"a": 1}) == {"a": 2}


def test_studioml_style_array_batch_with_vstack() -> None:
    # Studio.ML's Keras test passed batcher=np.vstack and items of shape (1, ...)
    items = [np.full((1, 4), float(i)) for i in range(5)]
    with ModelPipe() as pipe:
        pipe.add(lambda b: b.sum(axis=1, keepdims=True), batch_size=64, batcher=np.vstack)
        out = pipe.apply_ordered(items)
    assert [float(np.asarray(o).ravel()[0]) for o in out] == [0.0, 4.0, 8.0, 12.0, 16.0]
