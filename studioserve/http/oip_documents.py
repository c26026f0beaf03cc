"""The JSON documents of the Open Inference Protocol routes: server and model metadata, and
Triton's model configuration, built from the served model's signature and pipe."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from .._version import __version__
from ..tensors import TensorSpec
from ..wire.oip_codec import CONFIG_TYPES, VERSION, datatype_of
from .state import AppState

__all__ = ["model_config", "model_metadata", "server_metadata"]

EXTENSIONS: Final = ["binary_tensor_data", "model_configuration", "statistics"]


def _dims(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


def _spec_datatype(spec: TensorSpec) -> str:
    try:
        return datatype_of(np.dtype(spec.dtype))
    except (TypeError, ValueError):
        return "BYTES" if spec.dtype in ("string", "str", "object") else "FP32"


def _batched(state: AppState) -> bool:
    return state.service.model.batches and bool(state.service.inputs)


def _max_batch_size(state: AppState) -> int:
    pipe = state.service.model.pipe
    if pipe is None or not _batched(state):
        return 0
    return int(pipe.max_batch_size or 0)


def _tensor_meta(state: AppState, specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    batch = [-1] if _batched(state) else []
    return [
        {"name": s.name, "datatype": _spec_datatype(s), "shape": batch + _dims(s.shape)}
        for s in specs
    ]


def server_metadata() -> dict[str, Any]:
    return {"name": "studioserve", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(state: AppState) -> dict[str, Any]:
    model = state.service.model
    return {
        "name": state.info.experiment,
        "versions": [VERSION],
        "platform": f"studioserve_{model.kind}",
        "inputs": _tensor_meta(state, model.inputs),
        "outputs": _tensor_meta(state, model.outputs),
    }


def _config_tensors(specs: Sequence[TensorSpec], output: bool) -> list[dict[str, Any]]:
    out = []
    for s in specs:
        t: dict[str, Any] = {
            "name": s.name,
            "data_type": CONFIG_TYPES[_spec_datatype(s)],
            "dims": _dims(s.shape),
            "is_shape_tensor": False,
        }
        if output:
            t["label_filename"] = ""
        else:
            t.update(format="FORMAT_NONE", allow_ragged_batch=False, optional=False)
        out.append(t)
    return out


def model_config(state: AppState) -> dict[str, Any]:
    """Triton's model configuration of the served model."""
    model = state.service.model
    name = state.info.experiment
    delay_ms = float(state.info.max_delay_ms or 0.0)
    preferred: list[int] = []
    pipe = model.pipe
    stage = model.model_stage
    if pipe is not None and stage is not None:
        # a wrapper's pipe sets its own batching, not the server's: read its model stage
        stats = pipe.stats().stages.get(stage)
        if stats is not None:
            preferred = list(stats.preferred_batch_sizes)
            delay_ms = stats.max_delay * 1000
    cfg: dict[str, Any] = {
        "name": name,
        "platform": "",
        "backend": "studioserve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": _max_batch_size(state),
        "input": _config_tensors(model.inputs, False),
        "output": _config_tensors(model.outputs, True),
        "batch_input": [],
        "batch_output": [],
        "instance_group": [{"name": f"{name}_0", "kind": "KIND_CPU", "count": 1}],
        "default_model_filename": model.source,
        "parameters": {"studioserve_kind": {"string_value": model.kind}},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
    }
    if _batched(state):
        cfg["dynamic_batching"] = {
            "preferred_batch_size": preferred,
            "max_queue_delay_microseconds": int(round(delay_ms * 1000)),
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
        }
    return cfg
