"""Keras models (a ``.keras``/``.h5``/``.hdf5`` checkpoint, or one a wrapper built) as a Model.

Loading is the only place that imports Keras here, and only inside :func:`load_keras`, so
importing studioserve (and ``studio --help``) stays fast. The model is called through
:class:`~studioserve.pipelines.keras_stage.KerasRunner` (its fastest call path), as one
batching stage of a pipe; requests are validated once, against the signature, by
:class:`~studioserve.models.base.PipeModel` before anything is queued.

Outputs are named by :func:`~studioserve.pipelines.keras_stage.keras_signature`: a dict
model's keys, else each output layer's name, or ``output_0``, ``output_1``, ... where Keras
named the layer itself. A model of several outputs answers each request key with a dict by
those names, so pickle answers, OIP metadata and gRPC agree.

Instances (Triton's instance groups): ``KerasModel(..., instances=N)`` runs N copies of the
model in its one batching stage, fed by one queue, so whichever copy is free takes the next
batch. The first copy is the model given; each other copy is a clone with the same weights
(``keras.models.clone_model`` + ``set_weights``), checked to answer a fixed input as the first
does; a model whose clone fails or answers differently (a subclassed model that does not
rebuild from its config, state that is not in the weights such as an adapted lookup table) is
loaded again from its checkpoint instead, and checked the same way. Every copy is built and
called on its device: by default the GPUs TensorFlow sees, round-robin
(:func:`default_devices`: as many instances as GPUs puts one on each), else the CPU. Each copy
is warmed before the model serves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..pipelines.keras_stage import (
    KerasRunner,
    check_answers,
    clone_runner,
    device_scope,
    keras_signature,
)
from .artifacts import Artifact
from .base import PipeModel
from .batched import LoadOptions

logger = logging.getLogger(__name__)

__all__ = [
    "KerasModel",
    "build_mlp",
    "default_devices",
    "instance_devices",
    "load_keras",
    "quiet_tensorflow",
    "visible_gpus",
]

#: the suffixes of a Keras checkpoint file (one that :func:`load_keras` can load again)
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up lines (must run before TF is first imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def load_keras(path: Path, *, device: str | None = None) -> Any:
    """``keras.models.load_model(path, compile=False)`` with errors that name the fix.

    :param device: a device label ("CPU", "GPU:0", ...) to build the model's weights on
        (``tf.device``); None: TensorFlow's default placement.
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
        with device_scope(device):
            return keras.models.load_model(path, compile=False)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {e}. "
            "Check that the file is a complete Keras .keras/.h5 file saved by model.save(), "
            "or pass --wrapper with a create_model(modeldir) that loads it"
        ) from e


def default_devices(instances: int, gpus: Sequence[str]) -> list[str]:
    """The device of each of ``instances`` copies: ``gpus`` round-robin, else all "CPU".

    ``default_devices(4, ["GPU:0", "GPU:1"])`` is GPU:0, GPU:1, GPU:0, GPU:1; as many
    instances as GPUs puts one on each.

    :raises ValueError: for fewer than one instance.
    """
    _check_count(instances)
    if not gpus:
        return ["CPU"] * instances
    return [gpus[i % len(gpus)] for i in range(instances)]


def visible_gpus() -> list[str]:
    """The GPUs TensorFlow sees, as device labels ("GPU:0", "GPU:1", ...), in index order.

    Imports TensorFlow (here, never at module import); empty when it is not installed or sees
    no GPU. It lists physical devices only, so asking claims no GPU memory.
    """
    quiet_tensorflow()
    try:
        import tensorflow as tf
    except ImportError:
        return []
    try:
        found = tf.config.list_physical_devices("GPU")
    except Exception as e:  # a broken driver: serve on the CPU, and say why
        logger.warning("cannot list the GPUs (%s: %s); using the CPU", type(e).__name__, e)
        return []
    return [f"GPU:{i}" for i in range(len(found))]


def instance_devices(instances: int, devices: Sequence[str] | None) -> list[str]:
    """Check ``instances`` and ``devices``; the device of each instance.

    :param devices: one label per instance; None: :func:`default_devices` over
        :func:`visible_gpus`.
    :raises ValueError: for fewer than one instance or a wrong number of labels.
    """
    _check_count(instances)
    if devices is None:
        return default_devices(instances, visible_gpus())
    if isinstance(devices, str):
        raise ValueError(f"devices must be a list of labels, one per instance, not {devices!r}")
    labels = [str(d).strip() for d in devices]
    if len(labels) != instances:
        raise ValueError(
            f"{len(labels)} devices for {instances} instances; give one device per instance"
        )
    if not all(labels):
        raise ValueError('device labels must be non-empty, such as "CPU" or "GPU:0"')
    return labels


def _check_count(instances: int) -> None:
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be an integer >= 1, not {instances!r}")


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
    """A built Keras model behind a batching stage named ``keras``, as one or more instances.

    :param model: the Keras model (warmed once on zeros here): the first instance.
    :param source: the checkpoint or wrapper it came from.
    :param max_batch_size: most rows per model call.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param instances: copies of the model that the stage runs at once, fed by its one queue.
    :param devices: each instance's device ("CPU", "GPU:0", ...); default: the visible GPUs
        round-robin, else the CPU (:func:`default_devices`). On a Keras backend other than
        TensorFlow the copies are not placed (and ``devices`` must be left unset).
    :param checkpoint: the file to load another copy from when the model does not clone;
        default: ``source`` when it names a Keras checkpoint file.
    :raises ValueError: for invalid ``instances`` or ``devices``.
    :raises ModelLoadError: when a copy cannot be made, or does not answer as the model does.
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
        instances: int = 1,
        devices: Sequence[str] | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        labels = _keras_devices(instances, devices)
        if checkpoint is None and Path(source).suffix.lower() in _KERAS_SUFFIXES:
            checkpoint = Path(source) if Path(source).is_file() else None
        inputs, outputs = keras_signature(model)
        runners = [_first_copy(model, labels[0], checkpoint, source)]
        runners += [_copy(model, label, runners[0], checkpoint, source) for label in labels[1:]]
        models = [r.model for r in runners]
        calls = [_call(r, [s.name for s in outputs]) for r in runners]
        placed = [label for label in labels if label is not None]
        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(
            calls[0],
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            name="keras",
            instances=calls,
            devices=placed if len(placed) == len(labels) else None,
        )
        super().__init__(pipe, source=source, inputs=inputs, outputs=outputs)
        self.keras_model = model
        #: every instance's Keras model, in instance order (the first is :attr:`keras_model`
        #: unless its weights lived on another device than the first instance's)
        self.keras_models: tuple[Any, ...] = tuple(models)
        if len(models) > 1:
            logger.info("%s: %d instances on %s", source, len(models), ", ".join(map(str, labels)))


def _keras_devices(instances: int, devices: Sequence[str] | None) -> list[str | None]:
    """Each instance's device; None for each when the backend cannot place them (not TF)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return list(instance_devices(instances, devices))
    if devices is not None:
        raise ValueError(
            f"placing Keras instances on devices needs the TensorFlow backend (the backend is "
            f"{backend!r}); leave devices unset"
        )
    _check_count(instances)
    return [None] * instances


def _placed_on(model: Any, device: str) -> bool:
    """Whether every weight of ``model`` lives on ``device`` (True for a model without)."""
    import tensorflow as tf

    try:
        want = tf.DeviceSpec.from_string(device)
    except ValueError as e:
        raise ValueError(
            f'device {device!r} is not a TensorFlow device label such as "CPU" or "GPU:0": {e}'
        ) from e
    for w in model.weights:
        where = getattr(getattr(w, "value", w), "device", "") or ""
        got = tf.DeviceSpec.from_string(where)
        if (got.device_type or "").upper() != (want.device_type or "").upper():
            return False
        if want.device_index is not None and got.device_index != want.device_index:
            return False
    return True


def _first_copy(
    model: Any, device: str | None, checkpoint: Path | None, source: str
) -> KerasRunner:
    """A warmed runner of the model itself, or of a copy of it on ``device`` when its weights
    live elsewhere."""
    if device is None or _placed_on(model, device):
        runner = _runner(model, device)
        runner.warm()
        return runner
    logger.info("%s: the model's weights are not on %s; copying them there", source, device)
    reference = KerasRunner(model)
    reference.warm()
    return _copy(model, device, reference, checkpoint, source)


def _copy(
    model: Any, device: str | None, first: KerasRunner, checkpoint: Path | None, source: str
) -> KerasRunner:
    """A warmed runner of one more copy of ``model`` on ``device`` that answers as ``first``
    does: a clone, else the checkpoint loaded again.

    :raises ModelLoadError: when neither gives such a copy.
    """
    try:
        return clone_runner(model, device, first)
    except ValueError as e:
        if checkpoint is None:
            raise ModelLoadError(
                f"cannot make another instance of {source}: {e}. Serve one instance, or give "
                "the model as a checkpoint file (.keras/.h5) that can be loaded once per "
                "instance"
            ) from e
        logger.info("%s; loading %s again for another instance", e, checkpoint)
    runner = _runner(load_keras(checkpoint, device=device), device)
    try:
        runner.warm()
        check_answers(runner, first)
    except Exception as e:
        raise ModelLoadError(
            f"{checkpoint} loaded again for another instance does not answer as the first "
            f"does: {e}. Serve one instance"
        ) from e
    return runner


def _runner(model: Any, device: str | None) -> KerasRunner:
    """A runner for one instance's copy (placed on ``device`` when it has one)."""
    return KerasRunner(model) if device is None else KerasRunner(model, device=device)


def _call(runner: KerasRunner, outputs: Sequence[str]) -> Callable[[Any], Any]:
    """One instance's stage function: its runner, fed its inputs in input order; a model of
    several outputs answers a dict by output name (the names of its signature, so a pickle
    answer carries the names that OIP metadata and gRPC show)."""
    names = runner.input_names
    several = len(outputs) > 1
    if len(names) <= 1 and not several:
        return runner

    def named(out: Any) -> Any:
        if several and isinstance(out, (list, tuple)) and len(out) == len(outputs):
            return dict(zip(outputs, out, strict=True))
        return out

    if len(names) <= 1:
        return lambda batch: named(runner(batch))

    # validated items are dicts by input name; the runner takes them in input order
    def call(batch: Any) -> Any:
        return named(runner(tuple(batch[n] for n in names)))

    return call


def load(artifact: Artifact, options: LoadOptions) -> KerasModel:
    """The detection table's loader for a Keras checkpoint file."""
    return KerasModel(
        load_keras(artifact.path),
        source=str(artifact.path),
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        instances=options.instances,
        devices=options.devices,
    )
