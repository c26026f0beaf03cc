"""A TensorFlow SavedModel folder (``saved_model.pb``) served through its ``serving_default``.

The only module that imports TensorFlow to load a model, inside :class:`SavedModelFunction`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..tensors import TensorSpec, dtype_name, zeros_for
from .base import PipeModel
from .keras import quiet_tensorflow

__all__ = ["SavedModel", "SavedModelFunction"]


class SavedModelFunction:
    """A SavedModel's ``serving_default`` signature as a batched numpy function.

    :raises ModelLoadError: when TensorFlow is missing or the folder has no such signature.
    """

    def __init__(self, path: Path) -> None:
        quiet_tensorflow()
        try:
            import tensorflow as tf
        except ImportError as e:
            raise ModelLoadError(
                f"{path} is a TF SavedModel but TensorFlow is not installed; "
                "pip install 'studioserve[keras]'"
            ) from e
        try:
            self._loaded = tf.saved_model.load(str(path))
            self._fn = self._loaded.signatures["serving_default"]
        except Exception as e:
            raise ModelLoadError(
                f"cannot load TF SavedModel {path}: {type(e).__name__}: {e}. "
                "Export it with model.export(dir) or tf.saved_model.save(obj, dir, "
                "signatures=...) so it has a 'serving_default' signature"
            ) from e
        self._tf = tf
        _, kwargs = self._fn.structured_input_signature
        self.input_names = sorted(kwargs)
        self.inputs = [_spec(n, kwargs[n]) for n in self.input_names]
        out_specs = self._fn.structured_outputs
        self.output_names = sorted(out_specs)
        self.outputs = [_spec(n, out_specs[n]) for n in self.output_names]

    def __call__(self, batch: Any) -> Any:
        if len(self.input_names) == 1:
            feeds = {self.input_names[0]: self._tf.constant(batch)}
        else:
            feeds = {n: self._tf.constant(batch[n]) for n in self.input_names}
        result = self._fn(**feeds)
        if len(self.output_names) == 1:
            return result[self.output_names[0]].numpy()
        return {n: result[n].numpy() for n in self.output_names}


def _spec(name: str, tensor_spec: Any) -> TensorSpec:
    return TensorSpec(name, tuple(tensor_spec.shape)[1:], dtype_name(tensor_spec.dtype))


class SavedModel(PipeModel):
    """A SavedModel folder behind a batching stage named ``savedmodel``, warmed on zeros.

    :raises ModelLoadError: when it does not load or its warm-up call fails.
    """

    kind: ClassVar[str] = "savedmodel"

    def __init__(
        self, path: Path, *, max_batch_size: int, max_delay: float, queue_size: int
    ) -> None:
        fn = SavedModelFunction(path)
        try:
            fn(zeros_for(fn.inputs))
        except Exception as e:
            raise ModelLoadError(
                f"warm-up of SavedModel {path} on zeros of its input shape failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(fn, max_batch_size=max_batch_size, max_delay=max_delay, name="savedmodel")
        super().__init__(pipe, source=str(path), inputs=fn.inputs, outputs=fn.outputs)
