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
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec, converts_safely, dtype_name

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "KerasRunner", "converts_safely", "is_keras_model", "keras_signature"]

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
    :raises ValueError: for an unknown or unavailable method.

    The input of :meth:`__call__` is what :meth:`prepare` returns, stacked along axis 0: an
    array for a single-input model, a tuple of arrays (in ``model.inputs`` order) otherwise.
    The output is a numpy array, or a list/dict of arrays for a multi-output model.
    """

    def __init__(self, model: Any, *, method: str = "auto") -> None:
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
        self.method = method
        self._fn: Callable[..., Any] = self._build(method)

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
    """The per-example input and output specs of a Keras model (empty when not built)."""

    def specs(tensors: Any, prefix: str) -> list[TensorSpec]:
        out = []
        for i, t in enumerate(tensors or []):
            shape = tuple(None if d is None else int(d) for d in tuple(t.shape)[1:])
            name = getattr(t, "name", None) or f"{prefix}{i}"
            out.append(TensorSpec(str(name), shape, dtype_name(t.dtype)))
        return out

    try:
        return specs(model.inputs, "input_"), specs(model.outputs, "output_")
    except (AttributeError, ValueError, TypeError):
        return [], []
