"""Keras models (a ``.keras``/``.h5``/``.hdf5`` checkpoint, or one a wrapper built) as a Model.

Loading is the only place that imports Keras here, and only inside :func:`load_keras`, so
importing studioserve (and ``studio --help``) stays fast. The model is called through
:class:`~studioserve.pipelines.keras_stage.KerasRunner` (its fastest call path), as one
batching stage of a pipe; requests are validated once, against the signature, by
:class:`~studioserve.models.base.PipeModel` before anything is queued.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..pipelines.keras_stage import KerasRunner, keras_signature
from .base import PipeModel

logger = logging.getLogger(__name__)

__all__ = ["KerasModel", "build_mlp", "load_keras", "quiet_tensorflow"]


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up lines (must run before TF is first imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def load_keras(path: Path) -> Any:
    """``keras.models.load_model(path, compile=False)`` with errors that name the fix.

    :raises ModelLoadError: when Keras is missing or the file does not load.
    """
    quiet_tensorflow()
    try:
        import keras
    except ImportError as e:
        raise ModelLoadError(
            f"{path} is a Keras checkpoint but Keras is not installed; "
            "pip install 'studioserve[keras]'"
        ) from e
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {e}. "
            "Check that the file is a complete Keras .keras/.h5 file saved by model.save(), "
            "or pass --wrapper with a create_model(modeldir) that loads it"
        ) from e


def build_mlp(
    inputs: int,
    hidden: int,
    classes: int,
    *,
    seed: int = 0,
    input_name: str = "x",
    output_name: str = "y",
    name: str = "mlp",
) -> Any:
    """A small Keras MLP classifier (float32 features -> relu -> softmax), for the demo."""
    quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    x = keras.Input(shape=(inputs,), dtype="float32", name=input_name)
    h = keras.layers.Dense(hidden, activation="relu")(x)
    y = keras.layers.Dense(classes, activation="softmax", name=output_name)(h)
    return keras.Model(x, y, name=name)


class KerasModel(PipeModel):
    """A built Keras model behind a batching stage named ``keras``.

    :param model: the Keras model (warmed once on zeros here).
    :param source: the checkpoint or wrapper it came from.
    :param max_batch_size: most rows per model call.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    """

    kind: ClassVar[str] = "keras"

    def __init__(
        self,
        model: Any,
        *,
        source: str,
        max_batch_size: int,
        max_delay: float,
        queue_size: int,
    ) -> None:
        inputs, outputs = keras_signature(model)
        runner = KerasRunner(model)
        runner.warm()
        call: Any = runner
        names = runner.input_names
        if len(names) > 1:
            # validated items are dicts by input name; the runner takes them in input order
            def call(batch: Any) -> Any:
                return runner(tuple(batch[n] for n in names))

        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(call, max_batch_size=max_batch_size, max_delay=max_delay, name="keras")
        super().__init__(pipe, source=source, inputs=inputs, outputs=outputs)
        self.keras_model = model
