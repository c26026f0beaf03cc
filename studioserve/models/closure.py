"""Clipper-style Python closures: a cloudpickled function that computes a whole batch.

Clipper's Python closure deployer serves a function ``predict(inputs: list) -> list``: a batch
in, one output per input out, in order. studioserve serves the same file (the function saved
with ``cloudpickle.dump(predict, f)`` as ``*.cloudpickle`` or ``*.cpkl``) behind one batching
stage, so the items of concurrent requests meet in one call.

Loading a cloudpickle file runs code from it: the loader refuses it unless the user opts in
(``--trust-artifact``, or ``trust = true`` in serving.toml), so this module is reached only
with that trust. The closure's own imports must be installed here, and a cloudpickle file
loads only in the Python version that wrote it.

The closure is called one of two ways:

- With a signature (``[[input]]`` in serving.toml), each request key is checked against it
  and the function gets the stacked batch: an array of shape ``(n, *shape)``, or a dict of
  them by input name for several inputs. It returns one output per row: a list, an array, or
  a dict of them by output name (``[[output]]`` names and types them). The outputs are made
  arrays, so a key of one example answers that example's output, and n examples answer n.
- Without one, the function gets the list of the raw request values, one per key, not
  stacked (Clipper's own contract), and returns a list of as many outputs, each answered as
  computed.

A result of any other length fails the items of that call with a message that says so.
Instances share the one function, so a closure served with ``instances > 1`` must be
thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelLoadError
from ..tensors import TensorSpec
from .artifacts import Artifact
from .batched import BatchFunction, BatchFunctionModel, LoadOptions, missing_framework

logger = logging.getLogger(__name__)

__all__ = ["ClosureModel", "load", "load_closure"]

_CONTRACT = (
    "a closure takes a batch and returns one output per input, in order (Clipper's "
    "predict(inputs: list) -> list)"
)


class ClosureModel(BatchFunctionModel):
    """A cloudpickled function behind the model stage (see the module docstring)."""

    kind: ClassVar[str] = "closure"


def load(artifact: Artifact, options: LoadOptions) -> ClosureModel:
    """The detection table's loader for a ``*.cloudpickle`` / ``*.cpkl`` closure.

    :raises ModelLoadError: when cloudpickle is missing (naming the extra), the file does not
        load, it holds something that is not callable, or the warm-up call on zeros shaped
        like the serving.toml signature fails.
    """
    func = load_closure(artifact.path)
    source = str(artifact.path)
    inputs = tuple(options.inputs or ())
    outputs = tuple(options.outputs or ())
    call: BatchFunction
    batcher: Callable[[list[Any]], Any] | None
    if inputs:
        call, batcher = _stacked(func, outputs), None
    else:
        call, batcher = _listed(func), list
    name = getattr(func, "__qualname__", type(func).__name__)
    logger.info(
        "closure %s (%s): %s",
        source,
        name,
        "the batch stacked by the serving.toml signature"
        if inputs
        else "the list of raw request values (no [[input]] signature in serving.toml)",
    )
    return ClosureModel(
        [call] * max(1, options.instances),
        source=source,
        inputs=inputs,
        outputs=outputs,
        platform=artifact.framework.platform,
        max_batch_size=options.max_batch_size,
        max_delay=options.max_delay,
        queue_size=options.queue_size,
        devices=options.devices,
        warm=bool(inputs),
        batcher=batcher,
    )


def load_closure(path: Path) -> Callable[..., Any]:
    """The function cloudpickled in ``path`` (this runs code from the file: trusted only).

    :raises ModelLoadError: when cloudpickle is missing, the file does not load, or what it
        holds is not callable.
    """
    try:
        import cloudpickle
    except ImportError as e:
        raise missing_framework(f"the closure {path}", "cloudpickle", "closure") from e
    try:
        with Path(path).open("rb") as f:
            func = cloudpickle.load(f)
    except ModuleNotFoundError as e:
        raise ModelLoadError(
            f"cannot load closure {path}: it imports {e.name!r}, which is not installed here; "
            "install what the closure uses in the server's environment"
        ) from e
    except Exception as e:
        raise ModelLoadError(
            f"cannot load closure {path}: {type(e).__name__}: {e}. Save the function with "
            "cloudpickle.dump(predict, f), and load it with the Python version that saved it"
        ) from e
    if not callable(func):
        raise ModelLoadError(
            f"{path} holds a {type(func).__module__}.{type(func).__qualname__}, not a "
            f"function; {_CONTRACT}: save that function with cloudpickle.dump(predict, f)"
        )
    result: Callable[..., Any] = func
    return result


def _listed(func: Callable[[list[Any]], Any]) -> BatchFunction:
    """The batch function without a signature: the list of raw values in, a list out."""

    def call(batch: list[Any]) -> list[Any]:
        out = func(batch)
        count = None if isinstance(out, Mapping) else _count(out)
        if count != len(batch):
            raise ValueError(_wrong_length(out, count, len(batch)))
        return list(out)

    return call


def _stacked(func: Callable[[Any], Any], outputs: Sequence[TensorSpec]) -> BatchFunction:
    """The batch function with a signature: the stacked batch in, arrays of n rows out."""

    def call(batch: Any) -> Any:
        n = _batch_rows(batch)
        return _as_arrays(func(batch), n, outputs)

    return call


def _batch_rows(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch)


def _count(out: Any) -> int | None:
    """How many outputs ``out`` holds along its first axis (None for a scalar or text)."""
    if isinstance(out, np.ndarray):
        return int(out.shape[0]) if out.ndim else None
    if isinstance(out, (str, bytes)):
        return None
    try:
        return len(out)
    except TypeError:
        return None


def _wrong_length(out: Any, count: int | None, n: int) -> str:
    got = f"{count} outputs" if count is not None else f"a {type(out).__name__}"
    return f"the closure returned {got} for a batch of {n} inputs; {_CONTRACT}"


def _as_arrays(out: Any, n: int, outputs: Sequence[TensorSpec]) -> Any:
    """The closure's result as an array of ``n`` rows, or a dict of them by output name."""
    specs = {s.name: s for s in outputs}
    if isinstance(out, Mapping):
        return {k: _array(v, n, specs.get(str(k)), f"output {k!r}") for k, v in out.items()}
    count = _count(out)
    if count != n:
        raise ValueError(_wrong_length(out, count, n))
    if count and all(isinstance(o, Mapping) for o in out):  # one dict per row
        keys = list(out[0])
        return {k: _array([o[k] for o in out], n, specs.get(str(k)), f"output {k!r}") for k in keys}
    spec = outputs[0] if len(outputs) == 1 else None
    return _array(out, n, spec, "the output")


def _array(values: Any, n: int, spec: TensorSpec | None, what: str) -> np.ndarray[Any, Any]:
    dtype = spec.numpy_dtype if spec is not None else None
    if dtype is not None and dtype.kind in "OUS":
        dtype = None
    try:
        arr = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError) as e:
        if spec is not None and dtype is not None:
            raise ValueError(
                f"{what} does not convert to {spec.dtype}, the dtype serving.toml gives "
                f"{spec.name!r}: {e}"
            ) from None
        if _count(values) != n:
            raise ValueError(f"{what}: " + _wrong_length(values, _count(values), n)) from None
        arr = np.empty(n, dtype=object)  # ragged rows: one object each
        for i, v in enumerate(values):
            arr[i] = v
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ValueError(f"{what}: " + _wrong_length(values, _count(values), n))
    return arr
