"""The collector's thresholds while a server runs (studioserve._allocator.settle_gc)."""

from __future__ import annotations

import gc

import numpy as np

from studioserve import _allocator
from studioserve.models import PipeModel
from studioserve.pipelines import ModelPipe
from tests.helpers import running_server


def _model() -> PipeModel:
    pipe = ModelPipe(name="g")
    pipe.add(lambda b: b, max_batch_size=4)
    return PipeModel(pipe, source="g")


def test_a_server_raises_the_threshold_and_the_last_one_to_stop_restores_it() -> None:
    before = gc.get_threshold()
    assert before != _allocator.GC_THRESHOLDS
    with running_server("a", model=_model()):
        assert gc.get_threshold() == _allocator.GC_THRESHOLDS
        with running_server("b", model=_model()):
            assert gc.get_threshold() == _allocator.GC_THRESHOLDS
        assert gc.get_threshold() == _allocator.GC_THRESHOLDS  # "a" still serves
    assert gc.get_threshold() == before
    assert not gc.get_freeze_count()  # nothing frozen: an unloaded model is still collected


def test_cycles_are_still_collected_while_serving() -> None:
    with running_server("a", model=_model()):

        class Node:
            def __init__(self) -> None:
                self.me = self
                self.data = np.zeros(10)

        import weakref

        refs = [weakref.ref(Node()) for _ in range(100)]
        gc.collect()
        assert all(r() is None for r in refs)


def test_unsettle_without_settle_is_harmless() -> None:
    before = gc.get_threshold()
    _allocator.unsettle_gc()
    assert gc.get_threshold() == before
