"""A ModelPipe wrapper: pre-processing, a batched Keras model, argmax post-processing.

Send uint8 images (or any numeric array) of the model's input shape; each key gets back the
index of the most likely class. Items from concurrent requests share model calls::

    studio serve my-classifier --wrapper wrappers/keras_pipe.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from studioserve.pipelines import ModelPipe

BATCH_SIZE = 32


def _newest_checkpoint(modeldir: Path) -> Path:
    candidates = [p for p in modeldir.rglob("*") if p.suffix in (".keras", ".h5", ".hdf5")]
    if not candidates:
        raise FileNotFoundError(f"no .keras/.h5 checkpoint in {modeldir}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def create_model(modeldir: str) -> ModelPipe:
    """Load the newest Keras checkpoint in ``modeldir`` and wrap it in a three-stage pipe."""
    import keras

    model = keras.models.load_model(_newest_checkpoint(Path(modeldir)), compile=False)
    in_shape = tuple(model.inputs[0].shape[1:])

    def preprocess(x: Any) -> np.ndarray:
        """Scale to [0, 1] floats; one example of the input shape becomes a batch of one."""
        arr = np.asarray(x, dtype=np.float32) / 255.0
        return arr[np.newaxis] if arr.shape == in_shape else arr

    def postprocess(probs: Any) -> np.ndarray:
        """The most likely class of each row."""
        return np.argmax(np.asarray(probs), axis=-1)

    pipe = ModelPipe()
    pipe.add(preprocess, num_workers=1)
    pipe.add(model, batch_size=BATCH_SIZE)
    pipe.add(postprocess, num_workers=1)
    return pipe
