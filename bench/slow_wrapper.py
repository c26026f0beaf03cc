"""The "slow" benchmark workload as a studioserve wrapper: 50 ms per batch of up to 8 items.

A ModelPipe with one batching stage (``max_batch_size`` 8, one worker) whose function sleeps
50 ms and returns ``2 * x`` for each item, whatever the batch's size. Its capacity is therefore
known in advance: at most 8 items per 50 ms, 160 items/s, and any offered load above that
must be shed. ``bench_overload.py`` serves it::

    studio serve slow --wrapper bench/slow_wrapper.py

Send one ``(4,)`` float32 example per key (``{"x": np.ones(4, np.float32)}``); the answer is
``{"x": 2 * x}``. The batch time and size can be changed with ``SLOW_BATCH_SECONDS`` and
``SLOW_MAX_BATCH`` in the server's environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from studioserve.pipelines import ModelPipe

DIM = 4
BATCH_SECONDS = float(os.environ.get("SLOW_BATCH_SECONDS", "0.05"))
MAX_BATCH_SIZE = int(os.environ.get("SLOW_MAX_BATCH", "8"))


def build_pipe(
    batch_seconds: float = BATCH_SECONDS, max_batch_size: int = MAX_BATCH_SIZE
) -> ModelPipe:
    """A pipe: check the item and make it one row (submitting thread) -> one sleeping batched
    stage of at most ``max_batch_size`` items."""

    def check(x: Any) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape != (DIM,):
            raise ValueError(f"expected shape ({DIM},), got {arr.shape}")
        return arr[np.newaxis]  # one row: the batcher counts an array's first dimension

    def slow(batch: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(batch_seconds)
        return [x[0] * 2 for x in batch]

    pipe = ModelPipe(name="slow")
    pipe.add(check)
    pipe.add(slow, max_batch_size=max_batch_size, batcher=list, name="slow")
    return pipe


def create_model(modeldir: str) -> ModelPipe:
    """studioserve's wrapper entry point."""
    return build_pipe()
