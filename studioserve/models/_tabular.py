"""What the tabular runtimes share (scikit-learn, XGBoost, LightGBM): one matrix in, named
outputs out, the signature read from one call.

A tabular model computes on one matrix of ``n_features`` columns, one row per example. Its
input signature is one input named ``"input"`` of per-example shape ``(n_features,)`` (the
runtime gives the count and the dtype); serving.toml's ``[[input]]`` tables replace it: with
one input each example is flattened to a row (``shape = [28, 28]`` feeds a model of 784
columns), with several their columns are joined in the order the file lists them.

Its outputs are named (``label`` and ``probabilities``, ``prediction``, ...): the runtime gives
one function that computes them all from the matrix (so a classifier's label and probabilities
can come from one call). Their per-example shapes and dtypes come from one call on zeros when
the model is loaded; a model with one output answers each key with that array, one with several
answers a dict by output name (OIP names each output tensor so). serving.toml's ``[[output]]``
tables rename the outputs, in order, and give their specs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from ..errors import ModelLoadError
from ..tensors import TensorSpec, dtype_name
from .artifacts import Artifact
from .batched import BatchFunction, BatchFunctionModel, LoadOptions, example_batch

__all__ = ["INPUT", "Compute", "serve_tabular"]

#: the input's name when serving.toml gives none
INPUT = "input"

#: what a tabular model computes from one matrix: output name -> one row per example
Compute = Callable[[np.ndarray[Any, Any]], dict[str, Any]]

_M = TypeVar("_M", bound=BatchFunctionModel)

# the rows of the probe call (two, so an output that is not one row per example shows)
_PROBE_ROWS = 2


def serve_tabular(
    cls: type[_M],
    computes: Sequence[Compute],
    outputs: Sequence[str],
    *,
    artifact: Artifact,
    options: LoadOptions,
    n_features: int | None,
    dtype: str,
    devices: Sequence[str] | None = None,
) -> _M:
    """The served model computing ``outputs`` on each batch, one call per batch.

    :param cls: the runtime's model class.
    :param computes: each instance's function (one per instance).
    :param outputs: the names of what they compute, in order.
    :param artifact: the artifact they were loaded from.
    :param options: the load options (batching, the serving.toml signature).
    :param n_features: the matrix's columns (None or 0: unknown, serving.toml must say).
    :param dtype: the input's dtype when serving.toml does not give one.
    :param devices: each instance's device label.
    :raises ModelLoadError: without a known input, with a serving.toml output list that does
        not match the outputs, or when the first call fails.
    """
    source = str(artifact.path)
    inputs = _input_specs(options, n_features, dtype, source)
    names = _output_names(outputs, options.outputs, source)
    matrix = _matrix_of(inputs)
    calls = [_batch_function(matrix, c, outputs, names) for c in computes]
    specs = options.outputs or _probe(calls[0], inputs, names, source)
    return cls(
        calls,
        source=source,
        inputs=inputs,
        outputs=specs,
        platform=artifact.framework.platform,
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        devices=devices,
    )


def _input_specs(
    options: LoadOptions, n_features: int | None, dtype: str, source: str
) -> tuple[TensorSpec, ...]:
    if options.inputs:
        return options.inputs
    if not n_features:
        raise ModelLoadError(
            f"{source}: the model does not say how many features it takes; give its input in "
            'the experiment\'s serving.toml: [[input]] name = "input", dtype = "float32", '
            "shape = [N]"
        )
    return (TensorSpec(INPUT, (int(n_features),), dtype),)


def _output_names(
    defaults: Sequence[str], outputs: Sequence[TensorSpec] | None, source: str
) -> list[str]:
    if not outputs:
        return list(defaults)
    if len(outputs) != len(defaults):
        raise ModelLoadError(
            f"{source}: serving.toml lists {len(outputs)} output(s) "
            f"({', '.join(s.name for s in outputs)}) but the model computes {len(defaults)} "
            f"({', '.join(defaults)}); give one [[output]] per computed output, in that order"
        )
    return [s.name for s in outputs]


def _matrix_of(inputs: Sequence[TensorSpec]) -> Callable[[Any], np.ndarray[Any, Any]]:
    """The function from a stacked batch to the model's matrix (one row per example)."""
    if len(inputs) == 1:

        def rows(batch: Any) -> np.ndarray[Any, Any]:
            arr = np.asarray(batch)
            return arr if arr.ndim == 2 else arr.reshape(arr.shape[0], -1)

        return rows
    names = [s.name for s in inputs]

    def joined(batch: Any) -> np.ndarray[Any, Any]:
        parts = [np.asarray(batch[n]) for n in names]
        return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)

    return joined


def _batch_function(
    matrix: Callable[[Any], np.ndarray[Any, Any]],
    compute: Compute,
    outputs: Sequence[str],
    names: Sequence[str],
) -> BatchFunction:
    if len(outputs) == 1:
        only = outputs[0]

        def single(batch: Any) -> Any:
            return compute(matrix(batch))[only]

        return single
    if list(names) == list(outputs):

        def several(batch: Any) -> dict[str, Any]:
            return compute(matrix(batch))

        return several
    renamed = list(zip(names, outputs, strict=True))

    def several_renamed(batch: Any) -> dict[str, Any]:
        out = compute(matrix(batch))
        return {name: out[computed] for name, computed in renamed}

    return several_renamed


def _probe(
    call: BatchFunction, inputs: Sequence[TensorSpec], names: Sequence[str], source: str
) -> tuple[TensorSpec, ...]:
    """The output specs, read from one call on zeros shaped like the inputs."""
    try:
        out = call(example_batch(inputs, rows=_PROBE_ROWS))
    except Exception as e:
        raise ModelLoadError(
            f"{source}: the model failed its first call on zeros shaped like its signature "
            f"({', '.join(s.describe() for s in inputs)}): {type(e).__name__}: {e}; check the "
            "artifact, or set the signature in serving.toml"
        ) from e
    values = out if isinstance(out, dict) else {names[0]: out}
    specs = []
    for name in names:
        arr = np.asarray(values[name])
        if arr.ndim < 1 or arr.shape[0] != _PROBE_ROWS:
            raise ModelLoadError(
                f"{source}: output {name!r} has shape {arr.shape} for {_PROBE_ROWS} rows, not "
                "one row per example; serve this model with a wrapper"
            )
        dtype = "string" if arr.dtype.kind in "OSU" else dtype_name(arr.dtype)
        specs.append(TensorSpec(name, tuple(int(d) for d in arr.shape[1:]), dtype))
    return tuple(specs)
