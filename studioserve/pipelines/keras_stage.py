"""Keras models as pipe stages: recognising them, checking inputs, and calling them fast.

With :mod:`studioserve.models.keras` and :mod:`studioserve.models.savedmodel`, this is the only
module that touches Keras or TensorFlow, and it imports neither at module level:
:func:`is_keras_model` looks only at modules that are already imported (a Keras model cannot
exist unless Keras is), so a pipe of plain functions never pays for ``import keras``.

How a model is called (measured by ``bench/bench_pipe.py``): ``model.predict()`` costs tens of
milliseconds per call in a server and is never used. On the TensorFlow backend the fastest
path is a concrete function traced once from ``tf.function`` with a fixed input signature whose
batch dimension is ``None`` (so it is never retraced), fed numpy arrays directly; it beats
``predict_on_batch`` and the eager ``model(x, training=False)`` at every batch size. Other
backends (JAX, torch) use ``predict_on_batch``.

Instances (Triton's instance groups): a stage of N instances has N runners, one per copy of
the model, each warmed on its own. A copy may be placed on a device ("CPU", "GPU:0", ...):
:func:`clone_keras_model` builds a copy's weights under ``tf.device`` and a runner given a
``device`` traces and calls its function there (:func:`device_scope`); placement needs the
TensorFlow backend. :func:`clone_runner` makes one more instance of a model and checks that it
answers a fixed input (:meth:`KerasRunner.probe`) as the original does: a clone can run and
still lose state that is not in the weights (an adapted lookup table, for one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec, converts_safely, dtype_name

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "KerasRunner",
    "check_answers",
    "clone_keras_model",
    "clone_runner",
    "converts_safely",
    "device_scope",
    "is_keras_model",
    "keras_signature",
    "same_outputs",
]

#: the ways :class:`KerasRunner` can call a model ("auto" picks the fastest available)
METHODS = ("auto", "concrete", "tf_function", "predict_on_batch", "call")


def is_keras_model(obj: object) -> bool:
    """Whether ``obj`` is a Keras model, without importing Keras.

    Looks at ``keras`` and ``tf_keras`` only if they are already in :data:`sys.modules`.
    """
    for modname in ("keras", "tf_keras"):
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        cls = getattr(mod, "Model", None)
        if isinstance(cls, type) and isinstance(obj, cls):
            return True
    return False


def _describe(spec: TensorSpec) -> str:
    dims = ", ".join("n" if d is None else str(d) for d in (None, *spec.shape))
    dt = spec.dtype or "any dtype"
    return f"shape ({dims}{',' if not spec.shape else ''}) of {dt}"


class KerasRunner:
    """A Keras model as a batched pipe function: ``runner(batch) -> outputs as numpy``.

    :param model: a built Keras model (its ``inputs`` must be known for input checks and for
        the fast call path; a model without them is called with ``predict_on_batch`` and its
        items are not checked).
    :param method: one of :data:`METHODS`; ``"auto"`` uses the concrete function on the
        TensorFlow backend, else ``predict_on_batch``.
    :param device: a device label ("CPU", "GPU:0", ...) to trace and call the model on
        (``tf.device``); None: TensorFlow's default placement. The model's weights stay where
        they were built: build a copy for a device under :func:`device_scope` (as
        :func:`clone_keras_model` does).
    :raises ValueError: for an unknown or unavailable method, or a device on a backend other
        than TensorFlow.

    The input of :meth:`__call__` is what :meth:`prepare` returns, stacked along axis 0: an
    array for a single-input model, a tuple of arrays (in ``model.inputs`` order) otherwise.
    The output is a numpy array, or a list/dict of arrays for a multi-output model.
    """

    def __init__(self, model: Any, *, method: str = "auto", device: str | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown Keras call method {method!r}; use one of {METHODS}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        import keras  # already imported: the model exists

        self.model = model
        self.name: str = str(getattr(model, "name", None) or "model")
        inputs, _ = keras_signature(model)
        self.specs: list[TensorSpec] | None = inputs or None
        backend = keras.backend.backend()
        if method == "auto":
            method = "concrete" if backend == "tensorflow" and self.specs else "predict_on_batch"
        if method in ("concrete", "tf_function") and (backend != "tensorflow" or not self.specs):
            raise ValueError(
                f"the {method!r} call method needs the TensorFlow backend and a model with "
                f"known inputs (backend is {backend!r})"
            )
        if device is not None and backend != "tensorflow":
            raise ValueError(
                f"placing a Keras model on device {device!r} needs the TensorFlow backend "
                f"(backend is {backend!r}); leave devices unset"
            )
        self.method = method
        self.device = device
        with device_scope(device):
            fn = self._build(method)
        self._fn: Callable[..., Any] = fn if device is None else _placed(fn, device)

    # -- inputs --------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """The model's input names, in ``model.inputs`` order (empty when unknown)."""
        return [s.name for s in self.specs or ()]

    def prepare(self, item: Any) -> tuple[Any, int]:
        """Check one item against the model's inputs and convert it to the model's dtypes.

        A single-input model takes an array-like of shape ``(n, *input_shape)``; a multi-input
        model a dict keyed by input name or a list/tuple in input order.

        :returns: ``(value, rows)`` where value is an array or a tuple of arrays.
        :raises InvalidInput: for a missing input, a wrong shape or an unsafe dtype.
        """
        specs = self.specs
        if specs is None:
            arr = item if isinstance(item, np.ndarray) else np.asarray(item)
            return arr, (arr.shape[0] if arr.ndim else 1)
        if len(specs) == 1:
            spec = specs[0]
            if isinstance(item, Mapping):
                if set(item) != {spec.name}:
                    raise InvalidInput(
                        f"the model has one input {spec.name!r}; got keys {sorted(map(str, item))}"
                        f". Send an array, or a dict with just {spec.name!r}."
                    )
                item = item[spec.name]
            arr = _check(spec, item)
            return arr, arr.shape[0]
        if isinstance(item, Mapping):
            names = [s.name for s in specs]
            missing = [n for n in names if n not in item]
            extra = sorted(str(k) for k in item if k not in names)
            if missing or extra:
                raise InvalidInput(
                    f"the model's inputs are {names}; missing {missing}, unexpected {extra}"
                )
            values = [item[n] for n in names]
        elif isinstance(item, (list, tuple)) and len(item) == len(specs):
            values = list(item)
        else:
            raise InvalidInput(
                f"the model has {len(specs)} inputs {[s.name for s in specs]}: send a dict keyed "
                f"by input name or a list of {len(specs)} arrays, not {type(item).__name__}"
            )
        arrays = tuple(_check(s, v) for s, v in zip(specs, values, strict=True))
        rows = {a.shape[0] for a in arrays}
        if len(rows) != 1:
            got = {s.name: a.shape[0] for s, a in zip(specs, arrays, strict=True)}
            raise InvalidInput(f"the model's inputs must have the same number of rows; got {got}")
        return arrays, arrays[0].shape[0]

    def zeros(self, rows: int = 1) -> Any:
        """An input of ``rows`` rows of zeros (unknown dimensions set to 1)."""
        specs = self.specs or []
        arrays = tuple(
            np.zeros(
                (rows, *(1 if d is None else d for d in s.shape)), dtype=s.numpy_dtype or "float32"
            )
            for s in specs
        )
        return arrays[0] if len(arrays) == 1 else arrays

    # -- calling -------------------------------------------------------------------------------
    def _build(self, method: str) -> Callable[..., Any]:
        model = self.model
        specs = self.specs or []
        names = [s.name for s in specs]
        multi = len(specs) > 1

        def as_model_input(xs: Sequence[Any]) -> Any:
            return dict(zip(names, xs, strict=True)) if multi else xs[0]

        if method == "predict_on_batch":
            pob = model.predict_on_batch
            if multi:
                return lambda data: pob(dict(zip(names, data, strict=True)))
            return pob  # type: ignore[no-any-return]
        if method == "call":
            from keras import ops

            def call(data: Any) -> Any:
                out = model(as_model_input(data) if multi else data, training=False)
                return _to_numpy(out, ops.convert_to_numpy)

            return call
        import tensorflow as tf

        signature = [
            tf.TensorSpec(
                (None, *s.shape), dtype=tf.as_dtype(s.numpy_dtype or "float32"), name=None
            )
            for s in specs
        ]

        def forward(*xs: Any) -> Any:
            return model(as_model_input(xs), training=False)

        fn = tf.function(forward, input_signature=signature, autograph=False)
        if method == "concrete":
            fn = fn.get_concrete_function()

        def to_np(t: Any) -> Any:
            return t.numpy()

        if multi:
            return lambda data: _to_numpy(fn(*data), to_np)

        def single(data: Any) -> Any:
            out = fn(data)
            return out.numpy() if hasattr(out, "numpy") else _to_numpy(out, to_np)

        return single

    def __call__(self, data: Any) -> Any:
        return self._fn(data)

    def warm(self) -> None:
        """Call the model once on zeros, so that tracing and allocation happen now."""
        if self.specs is None:
            logger.debug("model %r has no known inputs; not warmed", self.name)
            return
        self(self.zeros(1))

    def probe(self, rows: int = 2) -> Any:
        """A fixed input of ``rows`` rows that exercises the model more than zeros do: seeded
        normal values for float inputs, zeros for the others (indices, booleans); None when
        the inputs are unknown."""
        if self.specs is None:
            return None
        rng = np.random.default_rng(0)
        arrays = []
        for s in self.specs:
            shape = (rows, *(1 if d is None else d for d in s.shape))
            dtype = s.numpy_dtype or np.dtype("float32")
            if dtype.kind == "f":
                arrays.append(rng.standard_normal(shape).astype(dtype))
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        return arrays[0] if len(arrays) == 1 else tuple(arrays)


def _placed(fn: Callable[[Any], Any], device: str) -> Callable[[Any], Any]:
    """``fn`` called under ``tf.device(device)``."""
    import tensorflow as tf

    def placed(data: Any) -> Any:
        with tf.device(device):
            return fn(data)

    return placed


@contextlib.contextmanager
def device_scope(device: str | None) -> Iterator[None]:
    """``tf.device(device)`` while the block runs (nothing for None).

    What is built in the block (a copy's weights, a traced function, a loaded SavedModel) is
    placed on ``device``. TensorFlow places softly: an op the device cannot run, or a device
    that is not there, falls back to the CPU instead of failing.
    """
    if device is None:
        yield
        return
    import tensorflow as tf

    with tf.device(device):
        yield


def clone_keras_model(model: Any, device: str | None = None) -> Any:
    """A copy of a built Keras model with its own weights (equal to the model's), built on
    ``device``: ``keras.models.clone_model`` then ``set_weights``.

    Functional and Sequential models clone; a subclassed model often does not (its clone is
    not built, or its config does not rebuild it): load another copy from its file instead.

    :raises ValueError: when the model cannot be cloned, naming the cause.
    """
    import keras

    name = getattr(model, "name", None) or "model"
    with device_scope(device):
        try:
            clone = keras.models.clone_model(model)
        except Exception as e:
            raise ValueError(f"Keras model {name!r} cannot be cloned: {_reason(e)}") from e
        weights = model.get_weights()
        if len(clone.weights) != len(weights):
            raise ValueError(
                f"the clone of Keras model {name!r} has {len(clone.weights)} weights, the "
                f"model {len(weights)} (a subclassed model whose clone is not built?)"
            )
        try:
            clone.set_weights(weights)
        except Exception as e:
            raise ValueError(
                f"the weights of Keras model {name!r} do not fit its clone: {_reason(e)}"
            ) from e
    return clone


def check_answers(runner: KerasRunner, reference: KerasRunner) -> None:
    """Check that ``runner`` answers :meth:`KerasRunner.probe` as ``reference`` does (within
    1e-3 relative: copies on devices of one kind compute alike).

    :raises ValueError: when it raises or answers differently (nothing to check for a model
        of unknown inputs).
    """
    probe = reference.probe()
    if probe is None:
        return
    try:
        got = runner(probe)
    except Exception as e:
        raise ValueError(f"the copy of Keras model {reference.name!r} fails: {_reason(e)}") from e
    if not same_outputs(got, reference(probe), rtol=1e-3, atol=1e-4):
        raise ValueError(
            f"the copy of Keras model {reference.name!r} does not answer as the model does "
            f"(state that is not in its weights, such as an adapted lookup table, was lost)"
        )


def clone_runner(model: Any, device: str | None, reference: KerasRunner) -> KerasRunner:
    """A warmed runner of a clone of ``model`` on ``device``, checked against ``reference``
    (a warmed runner of the model) with :func:`check_answers`.

    :raises ValueError: when the model does not clone, or its clone fails or answers
        differently; the message says why.
    """
    clone = clone_keras_model(model, device)
    runner = KerasRunner(clone) if device is None else KerasRunner(clone, device=device)
    try:
        runner.warm()
    except Exception as e:
        raise ValueError(
            f"the clone of Keras model {reference.name!r} fails on zeros: {_reason(e)}"
        ) from e
    check_answers(runner, reference)
    return runner


def _reason(e: BaseException) -> str:
    """An exception as one line: its type and its message, whitespace collapsed."""
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def same_outputs(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Whether two model outputs (arrays, or lists/dicts of arrays) match within tolerance."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return False
        return all(same_outputs(a[k], b[k], rtol=rtol, atol=atol) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))):
            return False
        return len(a) == len(b) and all(
            same_outputs(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b, strict=True)
        )
    x, y = np.asarray(a), np.asarray(b)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))


def _to_numpy(out: Any, conv: Callable[[Any], Any]) -> Any:
    if isinstance(out, dict):
        return {k: _to_numpy(v, conv) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_to_numpy(v, conv) for v in out]
    if isinstance(out, np.ndarray):
        return out
    return conv(out)


def _check(spec: TensorSpec, value: Any) -> np.ndarray[Any, Any]:
    """One input: the right rank, fixed dimensions and a safely convertible dtype."""
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError) as e:
        raise InvalidInput(
            f"input {spec.name!r} must be an array with {_describe(spec)}; could not convert "
            f"the {type(value).__name__} given: {e}"
        ) from e
    shape = spec.shape
    want = spec.numpy_dtype
    bad_dtype = False
    if want is not None and arr.dtype != want:
        bad_dtype = not converts_safely(arr.dtype, want)
    bad_shape = arr.ndim != len(shape) + 1 or any(
        d is not None and d != g for d, g in zip(shape, arr.shape[1:], strict=False)
    )
    if bad_shape or bad_dtype:
        got = f"shape {tuple(arr.shape)} of {arr.dtype.name}"
        hint = ""
        if (
            bad_shape
            and arr.ndim == len(shape)
            and all(d is None or d == g for d, g in zip(shape, arr.shape, strict=True))
        ):
            hint = " Add a leading batch axis (x[None]) to send one example."
        elif bad_dtype:
            hint = f" Send numbers that convert safely to {want.name if want else '?'}."
        raise InvalidInput(
            f"input {spec.name!r} expects {_describe(spec)}; got {got}.{hint}".replace("..", ".")
        )
    if want is not None and arr.dtype != want:
        arr = arr.astype(want)
    return arr


def keras_signature(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The per-example input and output specs of a Keras model (empty when not built).

    Inputs are named after their ``keras.Input`` layers. Outputs are named, stably across a
    save and load (never after their symbolic tensors, ``keras_tensor_7``, which change):

    - a model whose outputs are a dict: by its keys;
    - else each output by the layer that produces it (``Dense(3, name="probs")``: ``probs``),
      or ``output_0``, ``output_1``, ... by position when that layer was not given a name
      (Keras's own ``dense``, ``dense_3``) or two outputs would share one.
    """
    try:
        inputs = _specs(
            [(str(getattr(t, "name", None) or f"input_{i}"), t) for i, t in enumerate(model.inputs)]
        )
        structure = getattr(model, "output", None)
        if isinstance(structure, Mapping) and all(isinstance(k, str) for k in structure):
            return inputs, _specs(list(structure.items()))
        tensors = list(model.outputs or [])
        return inputs, _specs(list(zip(_output_names(model, tensors), tensors, strict=True)))
    except (AttributeError, ValueError, TypeError):
        return [], []


def _specs(named: Sequence[tuple[str, Any]]) -> list[TensorSpec]:
    return [
        TensorSpec(
            name,
            tuple(None if d is None else int(d) for d in tuple(t.shape)[1:]),
            dtype_name(t.dtype),
        )
        for name, t in named
    ]


def _output_names(model: Any, tensors: Sequence[Any]) -> list[str]:
    """Each output's producing layer's name, else ``output_<i>`` (see :func:`keras_signature`)."""
    layers = [_producer(model, t, i, len(tensors)) for i, t in enumerate(tensors)]
    names = [
        str(layer.name) if layer is not None and not _auto_named(layer) else None
        for layer in layers
    ]
    shared = {n for n in names if n is not None and names.count(n) > 1}
    return [n if n is not None and n not in shared else f"output_{i}" for i, n in enumerate(names)]


def _producer(model: Any, tensor: Any, i: int, count: int) -> Any:
    """The layer that produces output ``tensor`` (the ``i``-th of ``count``), or None."""
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None) or getattr(history, "layer", None)
    if layer is not None:
        return layer
    names = getattr(model, "output_names", None)
    if names and len(names) == count:
        try:
            return model.get_layer(names[i])
        except ValueError:
            return None
    layers = getattr(model, "layers", None)
    return layers[-1] if count == 1 and layers else None


def _snake_case(name: str) -> str:
    """A class name as Keras turns it into a layer's default name (``Conv2D`` -> ``conv2d``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _auto_named(layer: Any) -> bool:
    """Whether the layer's name is one Keras made up for it (``dense``, ``dense_3``)."""
    base = re.escape(_snake_case(type(layer).__name__))
    return re.fullmatch(rf"{base}(_\d+)?", str(layer.name)) is not None
