"""A test wrapper: a batching pipe that multiplies by 2 and takes a while per batch.

A value of 1000 or more in a batch makes that batch take 3 s (a request timeout test); each
batch also sleeps ``STUDIO_TEST_BATCH_SECONDS`` (default 0.02 s), so concurrent requests
queue up and batch, and a replica's queue can fill.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from studioserve.pipelines import ModelPipe


def create_model(modeldir: str) -> ModelPipe:
    pause = float(os.environ.get("STUDIO_TEST_BATCH_SECONDS", "0.02"))

    def double(batch: Any) -> np.ndarray:
        arr = np.asarray(batch, dtype=np.float32)
        time.sleep(3.0 if arr.size and float(arr.max()) >= 1000 else pause)
        return arr * 2

    pipe = ModelPipe()
    pipe.add(double, batch_size=16)
    return pipe
