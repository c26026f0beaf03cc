"""A TensorFlow SavedModel folder (``saved_model.pb``) served through its ``serving_default``.

The only module that imports TensorFlow to load a model, inside :class:`SavedModelFunction`.
``SavedModel(..., instances=N)`` loads the folder N times, each copy on its device (the visible
GPUs round-robin by default, else the CPU; see :func:`~studioserve.models.keras.default_devices`)
and runs them as the instances of its one batching stage, fed by one queue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..pipelines.keras_stage import device_scope
from ..tensors import TensorSpec, dtype_name, zeros_for
from .artifacts import Artifact
from .base import PipeModel
from .batched import LoadOptions
from .keras import instance_devices, quiet_tensorflow

logger = logging.getLogger(__name__)

__all__ = ["SavedModel", "SavedModelFunction"]


class SavedModelFunction:
    """A SavedModel's ``serving_default`` signature as a batched numpy function.

    :param device: a device label ("CPU", "GPU:0", ...) to load the model's variables on and
        call it on (``tf.device``); None: TensorFlow's default placement.
    :raises ModelLoadError: when TensorFlow is missing or the folder has no such signature.
    """

    def __init__(self, path: Path, *, device: str | None = None) -> None:
        quiet_tensorflow()
        try:
            import tensorflow as tf
        except ImportError as e:
            raise ModelLoadError(
                f"{path} is a TF SavedModel but TensorFlow is not installed; "
                "pip install 'studioserve[keras]'"
            ) from e
        try:
            with device_scope(device):
                self._loaded = tf.saved_model.load(str(path))
                self._fn = self._loaded.signatures["serving_default"]
        except Exception as e:
            raise ModelLoadError(
                f"cannot load TF SavedModel {path}: {type(e).__name__}: {e}. "
                "Export it with model.export(dir) or tf.saved_model.save(obj, dir, "
                "signatures=...) so it has a 'serving_default' signature"
            ) from e
        self._tf = tf
        self.device = device
        _, kwargs = self._fn.structured_input_signature
        self.input_names = sorted(kwargs)
        self.inputs = [_spec(n, kwargs[n]) for n in self.input_names]
        out_specs = self._fn.structured_outputs
        self.output_names = sorted(out_specs)
        self.outputs = [_spec(n, out_specs[n]) for n in self.output_names]

    def __call__(self, batch: Any) -> Any:
        if self.device is None:
            return self._call(batch)
        with self._tf.device(self.device):
            return self._call(batch)

    def _call(self, batch: Any) -> Any:
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

    :param instances: copies of the model (the folder loaded once each) that the stage runs at
        once, fed by its one queue.
    :param devices: each instance's device ("CPU", "GPU:0", ...); default: the visible GPUs
        round-robin, else the CPU.
    :raises ValueError: for invalid ``instances`` or ``devices``.
    :raises ModelLoadError: when it does not load or a warm-up call fails.
    """

    kind: ClassVar[str] = "savedmodel"

    @property
    def platform(self) -> str:
        return "tensorflow_savedmodel"

    def __init__(
        self,
        path: Path,
        *,
        max_batch_size: int,
        max_delay: float,
        queue_size: int,
        instances: int = 1,
        devices: Sequence[str] | None = None,
    ) -> None:
        labels = instance_devices(instances, devices)
        fns = [SavedModelFunction(path, device=label) for label in labels]
        for i, fn in enumerate(fns):
            try:
                fn(zeros_for(fn.inputs))
            except Exception as e:
                which = f" (instance {i}, on {labels[i]})" if len(fns) > 1 else ""
                raise ModelLoadError(
                    f"warm-up of SavedModel {path}{which} on zeros of its input shape failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
        first = fns[0]
        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(
            first,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            name="savedmodel",
            instances=fns,
            devices=labels,
        )
        super().__init__(pipe, source=str(path), inputs=first.inputs, outputs=first.outputs)
        if len(fns) > 1:
            logger.info("%s: %d instances on %s", path, len(fns), ", ".join(labels))


def load(artifact: Artifact, options: LoadOptions) -> SavedModel:
    """The detection table's loader for a SavedModel folder."""
    return SavedModel(
        artifact.path,
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        instances=options.instances,
        devices=options.devices,
    )
