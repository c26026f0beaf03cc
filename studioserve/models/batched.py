"""The base of every framework runtime: a batched function behind one batching stage.

A framework runtime (PyTorch, ONNX Runtime, scikit-learn, XGBoost, LightGBM, a closure,
PySpark) loads its artifact, reads the signature and hands :class:`BatchFunctionModel` one
function that computes a whole batch: stacked inputs in (one array of shape ``(n, *S)``, or a
dict of them for a model with several inputs), outputs for the ``n`` rows out (one array, or a
dict of arrays for several outputs). The model puts it behind a pipe stage named ``model``, so
items of concurrent requests meet in one call (Triton's dynamic batcher), validates each
request key once against the signature (:class:`~studioserve.models.base.PipeModel`), warms
the function before the model serves, and runs one copy per instance when the runtime gives
several (Triton's instance groups).

The runtime names the platform it reports in OIP metadata and configuration (Triton's names:
``pytorch_libtorch``, ``onnxruntime_onnx``; MLServer's for the tree models).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from ..errors import ModelLoadError
from ..pipelines import ModelPipe
from ..tensors import TensorSpec
from .base import PipeModel

logger = logging.getLogger(__name__)

__all__ = [
    "BatchFunction",
    "BatchFunctionModel",
    "LoadOptions",
    "example_batch",
    "missing_framework",
]

#: a function that computes one batch: stacked inputs -> one output per row
BatchFunction = Callable[[Any], Any]

#: the stage that runs the model (``ModelPipe.model_stage``, metrics, statistics)
MODEL_STAGE = "model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How to load and serve one artifact (what every framework's ``load`` receives).

    :param max_batch_size: most rows per model call.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param instances: copies of the model stage fed by one queue.
    :param devices: each instance's device label; None: the runtime's default (a visible GPU
        when it has one, else the CPU).
    :param trust: the user opted in to formats that run code when they load.
    :param inputs: the input signature for formats that carry none (serving.toml), or None.
    :param outputs: the output signature likewise.
    """

    max_batch_size: int = 128
    max_delay: float = 0.0
    queue_size: int = 4096
    instances: int = 1
    devices: tuple[str, ...] | None = None
    trust: bool = False
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None


def missing_framework(what: str, package: str, extra: str) -> ModelLoadError:
    """The error for a framework that is not installed: it names the extra to install."""
    return ModelLoadError(
        f"{what} needs {package}, which is not installed; pip install 'studioserve[{extra}]'"
    )


def example_batch(inputs: Sequence[TensorSpec], rows: int = 1) -> Any:
    """A batch of zeros that fits ``inputs`` (unknown dimensions as 1), for warm-up.

    :returns: one array for one input, a dict of arrays (by input name) for several.
    """
    arrays = {}
    for spec in inputs:
        shape = (rows, *(1 if d is None else int(d) for d in spec.shape))
        dtype = spec.numpy_dtype
        if dtype is None or dtype.kind in "OUS":
            arrays[spec.name] = np.full(shape, "", dtype=object)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=dtype)
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return arrays


class BatchFunctionModel(PipeModel):
    """A framework's batched call as a served model.

    :param calls: the batch function of each instance (one per copy; at least one).
    :param source: the artifact it came from (for messages).
    :param inputs: the per-example input signature (request keys are checked against it).
    :param outputs: the per-example output signature.
    :param platform: the platform name in OIP metadata and configuration.
    :param max_batch_size: most rows per call.
    :param max_delay: seconds a batch waits for more items after its first.
    :param queue_size: the pipe's input queue bound.
    :param devices: each instance's device label ("CPU", "cuda:0", ...), if placed.
    :param warm: call each instance once on :func:`example_batch` before serving (a runtime
        whose signature is not known exactly passes False and warms itself).
    :param batcher: ``list of items -> function input`` instead of stacking along axis 0 (a
        runtime without a signature passes ``list``: the function gets the raw values and
        returns one output per item); see ``ModelPipe.add``.
    :raises ModelLoadError: when a warm-up call fails (the message names the artifact).
    """

    kind: ClassVar[str] = "batched"

    def __init__(
        self,
        calls: Sequence[BatchFunction],
        *,
        source: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        platform: str,
        max_batch_size: int,
        max_delay: float,
        queue_size: int,
        devices: Sequence[str] | None = None,
        warm: bool = True,
        batcher: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not calls:
            raise ValueError("a BatchFunctionModel needs at least one batch function")
        calls = list(calls)
        if warm and inputs:
            start = time.perf_counter()
            for call in calls:
                _warm(call, inputs, source)
            logger.debug("%s: warmed in %.3fs", source, time.perf_counter() - start)
        pipe = ModelPipe(queue_size=queue_size, name="model")
        pipe.add(
            calls[0],
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            name=MODEL_STAGE,
            batcher=batcher,
            instances=calls if len(calls) > 1 else None,
            devices=list(devices) if devices is not None and len(devices) == len(calls) else None,
        )
        super().__init__(pipe, source=source, inputs=inputs, outputs=outputs)
        self._platform = platform

    @property
    def platform(self) -> str:
        return self._platform


def _warm(call: BatchFunction, inputs: Sequence[TensorSpec], source: str) -> None:
    try:
        call(example_batch(inputs, rows=1))
    except Exception as e:
        raise ModelLoadError(
            f"{source}: the model failed its warm-up call on zeros shaped like its signature "
            f"({', '.join(s.describe() for s in inputs)}): {type(e).__name__}: {e}; check the "
            "artifact, or set the signature in serving.toml"
        ) from e
