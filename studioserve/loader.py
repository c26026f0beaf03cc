"""From a modeldir (and an optional wrapper) to something that can serve predictions.

This is the only module that imports Keras/TensorFlow for loading, and only inside functions,
so importing studioserve (and ``studio --help``) stays fast.

- ``--wrapper FILE.py`` or ``--wrapper package.module``: ``create_model(modeldir)`` may return a
  :class:`~studioserve.pipelines.ModelPipe`, a Keras model, or a ``dict -> dict`` callable.
- No wrapper: the newest checkpoint by modification time among ``*.keras``, ``*.h5``,
  ``*.hdf5`` and TF SavedModel folders (``saved_model.pb``).
- No checkpoint: the identity model, with a warning (Studio.ML's behaviour).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVED_MODEL_FILE = "saved_model.pb"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, per-example shape (None: any size) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclasses.dataclass
class LoadedModel:
    """What the server needs to know about the loaded model.

    :param kind: ``"keras"``, ``"savedmodel"``, ``"pipe"``, ``"callable"`` or ``"identity"``.
    :param source: the checkpoint or wrapper it came from (for messages).
    :param pipe: the :class:`ModelPipe` that computes items (keras, savedmodel, pipe kinds).
    :param func: the ``dict -> dict`` callable (callable kind).
    :param inputs: the input signature, when known (used to validate requests).
    :param outputs: the output signature, when known.
    :param load_seconds: how long loading and warm-up took.
    """

    kind: str
    source: str
    pipe: Any = None
    func: Callable[[dict[str, Any]], Any] | None = None
    inputs: list[TensorSpec] = dataclasses.field(default_factory=list)
    outputs: list[TensorSpec] = dataclasses.field(default_factory=list)
    load_seconds: float = 0.0

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()

    def describe(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs) or "any"
        outs = ", ".join(s.describe() for s in self.outputs) or "any"
        return f"{self.kind} model from {self.source}: inputs ({ins}) -> outputs ({outs})"


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up lines (must run before TF is first imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def find_checkpoint(modeldir: Path) -> Path | None:
    """The newest checkpoint under ``modeldir`` by modification time, or None.

    Candidates: ``*.keras``, ``*.h5``, ``*.hdf5`` files and folders holding ``saved_model.pb``.
    """
    candidates: list[tuple[float, str, Path]] = []
    for path in modeldir.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            candidates.append((path.stat().st_mtime, str(path), path))
        elif path.is_file() and path.name == SAVED_MODEL_FILE:
            candidates.append((path.stat().st_mtime, str(path.parent), path.parent))
    if not candidates:
        return None
    candidates.sort()
    return candidates[-1][2]


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    try:
        return np.dtype(name).name
    except TypeError:
        return str(name)


def keras_signature(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The per-example input and output specs of a Keras model."""

    def specs(tensors: Any, prefix: str) -> list[TensorSpec]:
        out = []
        for i, t in enumerate(tensors or []):
            shape = tuple(t.shape)[1:]
            name = getattr(t, "name", None) or f"{prefix}{i}"
            out.append(TensorSpec(str(name), tuple(shape), _dtype_name(t.dtype)))
        return out

    try:
        inputs = specs(model.inputs, "input_")
        outputs = specs(model.outputs, "output_")
    except (AttributeError, ValueError):
        return [], []
    return inputs, outputs


def _load_keras(path: Path) -> Any:
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


class _SavedModelFunction:
    """A TF SavedModel's ``serving_default`` signature as a batched numpy function."""

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
        self.inputs = [
            TensorSpec(n, tuple(kwargs[n].shape)[1:], _dtype_name(kwargs[n].dtype))
            for n in self.input_names
        ]
        out_specs = self._fn.structured_outputs
        self.output_names = sorted(out_specs)
        self.outputs = [
            TensorSpec(n, tuple(out_specs[n].shape)[1:], _dtype_name(out_specs[n].dtype))
            for n in self.output_names
        ]

    def __call__(self, batch: Any) -> Any:
        if len(self.input_names) == 1:
            feeds = {self.input_names[0]: self._tf.constant(batch)}
        else:
            feeds = {n: self._tf.constant(batch[n]) for n in self.input_names}
        result = self._fn(**feeds)
        if len(self.output_names) == 1:
            return result[self.output_names[0]].numpy()
        return {n: result[n].numpy() for n in self.output_names}


def _zeros_for(specs: list[TensorSpec], rows: int = 1) -> Any:
    arrays = {s.name: np.zeros((rows, *[d or 1 for d in s.shape]), dtype=s.dtype) for s in specs}
    if len(specs) == 1:
        return next(iter(arrays.values()))
    return arrays


def import_wrapper(wrapper: str) -> Any:
    """Import a wrapper given as a file path or a module name.

    :raises ModelLoadError: when it cannot be imported; the message names the file and the fix.
    """
    path = Path(wrapper).expanduser()
    if wrapper.endswith(".py") or path.exists():
        if not path.is_file():
            raise ModelLoadError(
                f"wrapper file {wrapper} does not exist; pass a .py file path or a module name"
            )
        name = f"studioserve_wrapper_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"cannot import wrapper file {path}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelLoadError(
                f"importing wrapper {path} raised {type(e).__name__}: {e}; fix the wrapper"
            ) from e
        return module
    try:
        return importlib.import_module(wrapper)
    except ImportError as e:
        raise ModelLoadError(
            f"cannot import wrapper module {wrapper!r}: {e}. Pass a .py file path, or make "
            "the module importable (install it or add its folder to PYTHONPATH)"
        ) from e
    except Exception as e:
        raise ModelLoadError(
            f"importing wrapper {wrapper!r} raised {type(e).__name__}: {e}; fix the wrapper"
        ) from e


def _is_keras_model(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    if keras is None:
        return False
    try:
        return isinstance(obj, keras.Model)
    except AttributeError:
        return False


def _pipe_for_keras(model: Any, *, max_batch_size: int, max_delay: float, queue_size: int) -> Any:
    from .pipelines import ModelPipe

    pipe = ModelPipe(queue_size=queue_size, name="model")
    pipe.add(model, max_batch_size=max_batch_size, max_delay=max_delay, name="keras")
    return pipe


def load_model(
    modeldir: Path,
    wrapper: str | None = None,
    *,
    max_batch_size: int = 128,
    max_delay: float = 0.0,
    queue_size: int = 4096,
) -> LoadedModel:
    """Load and warm the model for ``modeldir``.

    :param modeldir: the experiment's local modeldir.
    :param wrapper: a wrapper file path or module name (its ``create_model(modeldir)`` decides).
    :param max_batch_size: the batch bound for the model stage of checkpoints.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :raises ModelLoadError: for an unreadable checkpoint or a broken wrapper.
    """
    start = time.monotonic()
    loaded = _load(
        Path(modeldir),
        wrapper,
        max_batch_size=max_batch_size,
        max_delay=max_delay,
        queue_size=queue_size,
    )
    loaded.load_seconds = time.monotonic() - start
    logger.info("loaded %s in %.2fs", loaded.describe(), loaded.load_seconds)
    return loaded


def _load(
    modeldir: Path, wrapper: str | None, *, max_batch_size: int, max_delay: float, queue_size: int
) -> LoadedModel:
    from .pipelines import ModelPipe

    if wrapper:
        module = import_wrapper(wrapper)
        create = getattr(module, "create_model", None)
        if not callable(create):
            raise ModelLoadError(
                f"wrapper {wrapper} has no create_model function; define "
                "'def create_model(modeldir): ...' returning a ModelPipe, a Keras model "
                "or a callable that maps a dict to a dict"
            )
        try:
            obj = create(str(modeldir))
        except Exception as e:
            raise ModelLoadError(
                f"create_model({str(modeldir)!r}) in wrapper {wrapper} raised "
                f"{type(e).__name__}: {e}; fix the wrapper"
            ) from e
        if isinstance(obj, ModelPipe):
            keras_model = getattr(obj, "keras_model", None)
            outputs = keras_signature(keras_model)[1] if keras_model is not None else []
            return LoadedModel(kind="pipe", source=wrapper, pipe=obj, outputs=outputs)
        if _is_keras_model(obj):
            inputs, outputs = keras_signature(obj)
            pipe = _pipe_for_keras(
                obj, max_batch_size=max_batch_size, max_delay=max_delay, queue_size=queue_size
            )
            return LoadedModel(
                kind="keras", source=wrapper, pipe=pipe, inputs=inputs, outputs=outputs
            )
        if callable(obj):
            return LoadedModel(kind="callable", source=wrapper, func=obj)
        raise ModelLoadError(
            f"create_model in wrapper {wrapper} returned {type(obj).__name__}; return a "
            "ModelPipe, a Keras model or a callable that maps a dict to a dict"
        )

    checkpoint = find_checkpoint(modeldir)
    if checkpoint is None:
        logger.warning(
            "no checkpoint (*.keras, *.h5, *.hdf5 or a SavedModel folder) in %s; "
            "serving the identity model (each value is returned as sent)",
            modeldir,
        )
        return LoadedModel(kind="identity", source=str(modeldir))
    if checkpoint.is_dir():
        fn = _SavedModelFunction(checkpoint)
        try:
            fn(_zeros_for(fn.inputs))
        except Exception as e:
            raise ModelLoadError(
                f"warm-up of SavedModel {checkpoint} on zeros of its input shape failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(fn, max_batch_size=max_batch_size, max_delay=max_delay, name="savedmodel")
        return LoadedModel(
            kind="savedmodel",
            source=str(checkpoint),
            pipe=pipe,
            inputs=fn.inputs,
            outputs=fn.outputs,
        )
    model = _load_keras(checkpoint)
    inputs, outputs = keras_signature(model)
    pipe = _pipe_for_keras(
        model, max_batch_size=max_batch_size, max_delay=max_delay, queue_size=queue_size
    )
    return LoadedModel(
        kind="keras", source=str(checkpoint), pipe=pipe, inputs=inputs, outputs=outputs
    )
