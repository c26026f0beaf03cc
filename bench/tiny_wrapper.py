"""The "tiny" benchmark workload as a studioserve wrapper: ``y = x @ W``, W float32 16x16.

The model is one numpy matmul, so a benchmark of it measures the HTTP and batching path, not
the model. ``W.npy`` in the modeldir holds W (``bench_server.py`` writes it); without it a
fixed W is used (seed 16). Send one ``(16,)`` example (one ``(16,)`` answer) or ``(n, 16)``
(``(n, 16)`` back)::

    studio serve tiny --wrapper bench/tiny_wrapper.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from studioserve.pipelines import ModelPipe

DIM = 16
MAX_BATCH_SIZE = 64


def make_weights(seed: int = 16) -> np.ndarray:
    """The W used when the modeldir has no ``W.npy``."""
    return np.random.default_rng(seed).standard_normal((DIM, DIM)).astype(np.float32)


def load_weights(modeldir: str | Path | None) -> np.ndarray:
    """W from ``modeldir/W.npy`` if there is one, else :func:`make_weights`."""
    if modeldir is not None:
        path = Path(modeldir) / "W.npy"
        if path.is_file():
            w = np.load(path, allow_pickle=False)
            if w.shape != (DIM, DIM):
                raise ValueError(f"{path} has shape {w.shape}; expected ({DIM}, {DIM})")
            return np.asarray(w, dtype=np.float32)
    return make_weights()


def build_pipe(w: np.ndarray, *, name: str = "tiny") -> ModelPipe:
    """A pipe: make rows (submitting thread) -> batched matmul -> unwrap single examples."""

    def to_rows(x: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(x, dtype=np.float32)
        if arr.shape == (DIM,):
            return arr[np.newaxis], True
        if arr.ndim != 2 or arr.shape[1] != DIM:
            raise ValueError(f"expected shape ({DIM},) or (n, {DIM}), got {arr.shape}")
        return arr, False

    def matmul(batch: list[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
        rows = [x for x, _ in batch]
        stacked = rows[0] if len(rows) == 1 else np.concatenate(rows)
        out = stacked @ w
        res = []
        start = 0
        for x, single in batch:
            end = start + x.shape[0]
            res.append(out[start] if single else out[start:end])
            start = end
        return res

    pipe = ModelPipe(name=name)
    pipe.add(to_rows)
    pipe.add(matmul, max_batch_size=MAX_BATCH_SIZE, batcher=list, name="matmul")
    return pipe


def create_model(modeldir: str) -> ModelPipe:
    """studioserve's wrapper entry point."""
    return build_pipe(load_weights(modeldir))
